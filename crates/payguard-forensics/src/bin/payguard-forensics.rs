//! The standalone `payguard-forensics` binary: a thin shell over [`payguard_forensics::run`],
//! so the crate can be tested and benchmarked end to end before it joins the `payguard` binary.
#![forbid(unsafe_code)]

use clap::Parser;
use payguard_forensics::ForensicsArgs;

#[derive(Parser)]
#[command(
    name = "payguard-forensics",
    version,
    about = "Race reconstruction from payment logs"
)]
struct Cli {
    #[command(flatten)]
    args: ForensicsArgs,
}

fn main() {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let code = match payguard_forensics::run(&cli.args, &mut out) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("payguard forensics: {e:#}");
            2
        }
    };
    drop(out);
    std::process::exit(code);
}
