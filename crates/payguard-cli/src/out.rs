//! Standard output that ends quietly when its reader goes away.
//!
//! `payguard audit --fix-plan | head -5` closes the pipe after five lines; Rust
//! ignores SIGPIPE, so the next `println!` fails with `BrokenPipe` and panics with
//! a backtrace. Every subcommand prints through [`outln!`] / [`out!`] instead:
//! a closed pipe ends the process with status 0, as ripgrep and the coreutils
//! do (the reader has what it asked for); any other write error is reported and
//! ends it with status 2.

use std::io::Write;

/// Writes `args` to standard output; see the module doc for what a failed
/// write does.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        exit_on(e);
    }
}

/// Ends the process for a failed write to standard output: quietly when the
/// reader went away, with a message otherwise.
pub fn exit_on(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("payguard: writing to standard output: {e}");
    std::process::exit(2);
}

/// True when `e` (anywhere in its chain) is a closed pipe: the reader has gone.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` that ends quietly on a closed pipe.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends quietly on a closed pipe.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}
