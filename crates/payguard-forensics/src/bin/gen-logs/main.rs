//! `gen-logs`: writes deterministic, production-looking mixed payment logs for the benchmark,
//! with a known number of injected double charges and healthy race windows, so a benchmark run
//! also checks its answer (`expected.json` beside the logs).
//!
//! Why a generator and not real logs: the size and the right answer must both be known.
//! Output: DIR/logs/ with one file per host (`pay-N.log`, or `pay-N.log.zst` for the last `--zst-hosts`), all
//! five formats mixed line by line, noise lines (access logs, health JSON, stack traces, banners,
//! binary junk, cut-off JSON), slightly out-of-order lines, and a midnight crossing.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::Parser;

mod render;

use render::{render, rfc3339, Fmt, Line};

#[derive(Parser)]
#[command(
    name = "gen-logs",
    about = "Deterministic mixed payment logs for benchmarking forensics"
)]
struct Cli {
    /// Total size to write, e.g. 1G, 200M, 64K.
    #[arg(long, default_value = "100M")]
    bytes: String,
    /// Write exactly this many orders instead of stopping at `--bytes` (so corpora that differ
    /// only in how times are written hold the same orders).
    #[arg(long)]
    orders: Option<u64>,
    /// Output folder (created): logs go to DIR/logs/, the right answer to DIR/expected.json.
    #[arg(long)]
    out: PathBuf,
    /// Number of hosts (files).
    #[arg(long, default_value_t = 4)]
    hosts: u32,
    /// The last N hosts are written zstd-compressed.
    #[arg(long, default_value_t = 0)]
    zst_hosts: u32,
    /// One injected double charge every N orders.
    #[arg(long, default_value_t = 20_000)]
    incident_every: u64,
    /// One healthy race (a duplicate storm pair or triple, one debit) every N orders.
    #[arg(long, default_value_t = 40)]
    race_every: u64,
    /// Milliseconds between order starts.
    #[arg(long, default_value_t = 20)]
    order_gap_ms: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The last N hosts take no part in races across hosts (a duplicate storm of theirs stays on
    /// one host): their clocks have no cross-host evidence.
    #[arg(long, default_value_t = 0)]
    solo_hosts: u32,
    /// HOST=ZONE: HOST writes local time in ZONE (e.g. +08:00, -05:00, +05:30) without a zone;
    /// repeatable. The truth (`expected.json`) stays in UTC.
    #[arg(long, value_name = "HOST=ZONE", allow_hyphen_values = true)]
    local: Vec<String>,
    /// HOST=MS: HOST's clock is MS milliseconds off (may be negative); repeatable.
    #[arg(long, value_name = "HOST=MS", allow_hyphen_values = true)]
    skew: Vec<String>,
    /// Replaying requests of a duplicate storm log taking and releasing the order's lock (one
    /// after the other, after the committer released it), as payguard's lock path does.
    #[arg(long)]
    replay_locks: bool,
    /// HOST=MS@SECS: HOST's clock steps by MS milliseconds SECS seconds into the run (mid-file).
    #[arg(long, value_name = "HOST=MS@SECS", allow_hyphen_values = true)]
    step: Vec<String>,
    /// Commits write ledger ids from one sequence shared by every host, as one database hands
    /// them out (`E` then a number that grows with the true commit time), instead of
    /// per-order ids (`E<order>-<n>`) that say nothing about time.
    #[arg(long)]
    ledger_ids: bool,
}

/// The per-host clocks from `--local` and `--skew`.
fn host_clocks(cli: &Cli) -> Vec<render::HostClock> {
    let mut v: Vec<render::HostClock> = Vec::new();
    let mut get = |h: &str| -> usize {
        if let Some(i) = v.iter().position(|c| c.host == h) {
            return i;
        }
        v.push(render::HostClock {
            host: h.to_string(),
            shift_us: 0,
            zone_less: false,
            step_from_us: i64::MAX,
            step_us: 0,
        });
        v.len() - 1
    };
    let mut shifts: Vec<(usize, i64, bool)> = Vec::new();
    for l in &cli.local {
        let (h, z) = l.split_once('=').expect("--local HOST=ZONE");
        let (sign, hm) = z.split_at(1);
        let (hh, mm) = hm.split_once(':').unwrap_or((hm, "0"));
        let secs = hh.parse::<i64>().expect("zone hours") * 3600
            + mm.parse::<i64>().expect("zone minutes") * 60;
        let secs = if sign == "-" { -secs } else { secs };
        shifts.push((get(h), secs * 1_000_000, true));
    }
    for k in &cli.skew {
        let (h, ms) = k.split_once('=').expect("--skew HOST=MS");
        shifts.push((get(h), ms.parse::<i64>().expect("skew ms") * 1000, false));
    }
    let mut steps: Vec<(usize, i64, i64)> = Vec::new();
    for k in &cli.step {
        let (h, rest) = k.split_once('=').expect("--step HOST=MS@SECS");
        let (ms, secs) = rest.split_once('@').expect("--step HOST=MS@SECS");
        let from = T_START_US + secs.parse::<i64>().expect("step secs") * 1_000_000;
        steps.push((get(h), ms.parse::<i64>().expect("step ms") * 1000, from));
    }
    for (i, us, from) in steps {
        v[i].step_us = us;
        v[i].step_from_us = from;
    }
    for (i, us, zone_less) in shifts {
        v[i].shift_us += us;
        v[i].zone_less |= zone_less;
    }
    v
}

/// Extra `key=value` fields of one line.
type Fieldset = Vec<(&'static str, String)>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("size like 1G") * mul
}

struct Out {
    files: Vec<Box<dyn Write>>,
    written: u64,
    lines: u64,
    event_lines: u64,
    delayed: BinaryHeap<Reverse<(i64, usize, String)>>,
}

impl Out {
    fn put(&mut self, host: usize, s: &str, event: bool) {
        self.files[host].write_all(s.as_bytes()).expect("write");
        self.written += s.len() as u64;
        self.lines += 1;
        if event {
            self.event_lines += 1;
        }
    }
    fn flush_until(&mut self, ts: i64) {
        while let Some(Reverse((t, _, _))) = self.delayed.peek() {
            if *t > ts {
                break;
            }
            let Reverse((_, h, s)) = self.delayed.pop().expect("peeked");
            self.put(h, &s, true);
        }
    }
}

const NOISE: [&str; 6] = [
    "127.0.0.1 - - [26/Nov/2026:02:16:43 +0000] \"GET /healthz HTTP/1.1\" 200 2 \"-\" \"kube-probe/1.29\"\n",
    "java.lang.IllegalStateException: connection reset\n",
    "    at com.pay.gateway.Client.call(Client.java:212)\n",
    "    at com.pay.gateway.Retry.run(Retry.java:88)\n",
    "=============== payguard starting (build 4f2a9c) ===============\n",
    "\n",
];

/// Formats of dated lines, picked at random per request (plain text is picked apart).
const FMTS: [Fmt; 6] = [
    Fmt::Text,
    Fmt::Json,
    Fmt::Json,
    Fmt::Tracing,
    Fmt::Logfmt,
    Fmt::Text,
];

/// 21:00 UTC the day before: the run crosses midnight after three hours.
const T_START_US: i64 = (20_782 * 86_400 + 21 * 3600) * 1_000_000;

/// What `expected.json` counts.
#[derive(Default)]
struct Counts {
    orders: u64,
    incidents: u64,
    lost: i64,
    races: u64,
    /// Incidents by kind: naive race, plain req-less, late second debit.
    kinds: [u64; 3],
}

/// One order being written: its number, start, id, amount and first host.
struct Order {
    seq: u64,
    t0: i64,
    oid: String,
    amount: i64,
    h0: usize,
}

/// The generator while it writes: the files, the random stream, the hosts and the counts.
struct Gen {
    out: Out,
    rng: Rng,
    hosts: Vec<String>,
    counts: Counts,
    /// Hosts that races may span (the first ones; see `--solo-hosts`).
    shared_hosts: usize,
    /// See `--replay-locks`.
    replay_locks: bool,
}

fn main() {
    let cli = Cli::parse();
    let _ = render::CLOCKS.set(host_clocks(&cli));
    let _ = render::LEDGER_IDS.set(cli.ledger_ids);
    let target = parse_size(&cli.bytes);
    let logs = cli.out.join("logs");
    std::fs::create_dir_all(&logs).expect("create out dir");
    let nh = cli.hosts.max(1) as usize;
    let hosts: Vec<String> = (1..=nh).map(|i| format!("pay-{i}")).collect();
    let (files, names) = open_files(&logs, &hosts, cli.zst_hosts as usize);
    let mut g = Gen {
        out: Out {
            files,
            written: 0,
            lines: 0,
            event_lines: 0,
            delayed: BinaryHeap::new(),
        },
        rng: Rng(cli.seed),
        shared_hosts: nh.saturating_sub(cli.solo_hosts as usize).max(1),
        replay_locks: cli.replay_locks,
        hosts,
        counts: Counts::default(),
    };
    let mut seq: u64 = 0;
    while cli.orders.map_or(g.out.written < target, |n| seq < n) {
        seq += 1;
        g.order(&cli, seq);
    }
    let mut out = g.out;
    let Counts {
        orders,
        incidents,
        lost,
        races,
        kinds,
    } = g.counts;
    let t_start = T_START_US;
    out.flush_until(i64::MAX);
    let (written, lines, event_lines) = (out.written, out.lines, out.event_lines);
    for mut f in out.files.drain(..) {
        f.flush().expect("flush");
    }
    let summary = format!(
        "{{\"bytes_uncompressed\":{written},\"lines\":{lines},\"event_lines\":{event_lines},\"orders\":{orders},\
\"hosts\":{nh},\"files\":{:?},\"incidents\":{incidents},\"incidents_by_kind\":{{\"naive_race\":{},\"plain_reqless\":{},\"late_second_debit\":{}}},\
\"amount_lost\":{lost},\"healthy_race_windows\":{races},\"first_ts\":\"{}\"}}\n",
        names,
        kinds[0],
        kinds[1],
        kinds[2],
        rfc3339(t_start)
    );
    std::fs::write(cli.out.join("expected.json"), &summary).expect("write expected.json");
    print!("{summary}");
}

/// One file per host, the last `zst_hosts` zstd-compressed; gives the writers and file names.
fn open_files(
    logs: &Path,
    hosts: &[String],
    zst_hosts: usize,
) -> (Vec<Box<dyn Write>>, Vec<String>) {
    let nh = hosts.len();
    let mut files: Vec<Box<dyn Write>> = Vec::new();
    let mut names = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let zst = i >= nh.saturating_sub(zst_hosts);
        let name = if zst {
            format!("{h}.log.zst")
        } else {
            format!("{h}.log")
        };
        let f = BufWriter::with_capacity(1 << 20, File::create(logs.join(&name)).expect("create"));
        files.push(if zst {
            Box::new(
                zstd::stream::write::Encoder::new(f, 1)
                    .expect("zstd")
                    .auto_finish(),
            )
        } else {
            Box::new(f)
        });
        names.push(name);
    }
    (files, names)
}

impl Gen {
    /// Writes order number `seq`: noise around it, then an injected incident, a healthy race
    /// or a normal order.
    fn order(&mut self, cli: &Cli, seq: u64) {
        let nh = self.hosts.len();
        self.counts.orders += 1;
        let t0 = T_START_US + (seq * cli.order_gap_ms * 1000) as i64 + self.rng.below(5000) as i64;
        self.out.flush_until(t0);
        let oid = format!("OD{}{:09}", 20_261_125, seq);
        let amount = (100 + self.rng.below(5_000_000)) as i64;
        let h0 = self.rng.below(nh as u64) as usize;
        let o = Order {
            seq,
            t0,
            oid,
            amount,
            h0,
        };
        self.noise(&o);
        let inject = cli.incident_every > 0 && seq % cli.incident_every == cli.incident_every / 2;
        let race = !inject && cli.race_every > 0 && seq.is_multiple_of(cli.race_every);
        if inject {
            self.incident(&o);
        } else if race {
            self.race(&o);
        } else {
            self.normal(&o);
        }
    }

    /// Noise around every order: about one noise line per order.
    fn noise(&mut self, o: &Order) {
        let Order { t0, .. } = *o;
        let oid: &str = &o.oid;
        let (out, rng, hosts) = (&mut self.out, &mut self.rng, &self.hosts);
        let nh = hosts.len();
        for _ in 0..(rng.below(3)) {
            let h = rng.below(nh as u64) as usize;
            let pick = rng.below(100);
            let s = if pick < 40 {
                format!(
                    "{{\"ts\":\"{}\",\"level\":\"INFO\",\"event\":\"http_request\",\"path\":\"/v1/health\",\"status\":200,\"dur_ms\":{}}}\n",
                    rfc3339(t0),
                    rng.below(9)
                )
            } else if pick < 55 {
                format!(
                    "{} [INFO] order_query: oid={oid}, found=true, inst={}\n",
                    rfc3339(t0),
                    hosts[h]
                )
            } else if pick < 97 {
                NOISE[rng.below(NOISE.len() as u64) as usize].to_string()
            } else if pick < 99 {
                let full = format!("{{\"ts\":\"{}\",\"level\":\"INFO\",\"event\":\"http_request\",\"path\":\"/v1/deduct\",\"status\":200}}", rfc3339(t0));
                let cut = 10 + rng.below(full.len() as u64 - 20) as usize;
                format!("{}\n", &full[..cut])
            } else {
                "\u{1}\u{2}PK\u{3}\u{4}\u{0}\u{0}binary\u{7f}\n".to_string()
            };
            out.put(h, &s, false);
        }
    }

    /// An injected double charge, of one of three kinds in turn.
    fn incident(&mut self, o: &Order) {
        let c = &mut self.counts;
        c.incidents += 1;
        c.lost += o.amount;
        let kind = (c.incidents % 3) as usize;
        c.kinds[kind] += 1;
        let h1 = (o.h0 + 1) % self.hosts.len();
        match kind {
            0 => self.naive_race(o, h1),
            1 => self.plain_reqless(o),
            _ => self.late_second_debit(o, h1),
        }
    }

    fn naive_race(&mut self, o: &Order, h1: usize) {
        let Order {
            seq,
            t0,
            amount,
            h0,
            ..
        } = *o;
        let oid: &str = &o.oid;
        let (out, rng, hosts, fmts) = (&mut self.out, &mut self.rng, &self.hosts, &FMTS);
        // Naive guard: two requests race on two hosts and both debit.
        let gap = 200 + rng.below(3000) as i64;
        let (ra, rb) = (format!("r{seq}a"), format!("r{seq}b"));
        for (h, r, d) in [(h0, &ra, 0i64), (h1, &rb, gap)] {
            let f = fmts[rng.below(fmts.len() as u64) as usize];
            let mut emit = |dt: i64, level: &str, ev: &str, extra: &[(&str, String)]| {
                let l = Line {
                    ts: t0 + d + dt,
                    level,
                    event: ev,
                    oid,
                    req: Some(r),
                    host: &hosts[h],
                    extra,
                };
                let s = render(f, &l);
                out.put(h, &s, true);
            };
            emit(0, "INFO", "deduct_start", &[]);
            emit(
                300,
                "INFO",
                "order_cache_set",
                &[("status", "PREPARE".into())],
            );
            emit(
                9000,
                "INFO",
                "deduct_commit",
                &[
                    ("entry", format!("E{seq}-{d}")),
                    ("amount", amount.to_string()),
                    ("balance_after", "0".into()),
                ],
            );
            if d > 0 {
                emit(
                    9100,
                    "WARN",
                    "duplicate_deduct",
                    &[("amount", amount.to_string()), ("entries", "2".into())],
                );
            }
            emit(
                9500,
                "INFO",
                "deduct_end",
                &[("outcome", "committed".into()), ("dur_ms", "9".into())],
            );
        }
    }

    fn plain_reqless(&mut self, o: &Order) {
        let Order { t0, amount, h0, .. } = *o;
        let oid: &str = &o.oid;
        let (out, hosts) = (&mut self.out, &self.hosts);
        // The incident's own shape: req-less plain text, no date, one host.
        let l1 = Line {
            ts: t0,
            level: "INFO",
            event: "order_cache_set",
            oid,
            req: None,
            host: &hosts[h0],
            extra: &[("status", "PREPARE".into())],
        };
        out.put(h0, &render(Fmt::Plain, &l1), true);
        let l2 = Line {
            ts: t0 + 1000,
            ..l1
        };
        out.put(h0, &render(Fmt::Plain, &l2), true);
        let ex = [("amount", amount.to_string())];
        let l3 = Line {
            ts: t0 + 227_000,
            level: "WARN",
            event: "duplicate_deduct",
            extra: &ex,
            ..l1
        };
        out.put(h0, &render(Fmt::Plain, &l3), true);
    }

    fn late_second_debit(&mut self, o: &Order, h1: usize) {
        let Order {
            seq,
            t0,
            amount,
            h0,
            ..
        } = *o;
        let oid: &str = &o.oid;
        let (out, rng, hosts, fmts) = (&mut self.out, &mut self.rng, &self.hosts, &FMTS);
        // A late second debit, minutes later, no overlap.
        let later = (120 + rng.below(360)) as i64 * 1_000_000;
        for (h, r, d) in [
            (h0, format!("r{seq}a"), 0i64),
            (h1, format!("r{seq}b"), later),
        ] {
            let f = fmts[rng.below(fmts.len() as u64) as usize];
            let evs: [(i64, &str, &str, Fieldset); 4] = [
                (0, "INFO", "deduct_start", vec![]),
                (
                    4000,
                    "INFO",
                    "deduct_commit",
                    vec![
                        ("entry", format!("E{seq}-{d}")),
                        ("amount", amount.to_string()),
                        ("balance_after", "0".into()),
                    ],
                ),
                (
                    4100,
                    "WARN",
                    if d > 0 {
                        "duplicate_deduct"
                    } else {
                        "lock_released"
                    },
                    if d > 0 {
                        vec![("amount", amount.to_string())]
                    } else {
                        vec![("token", "7".into())]
                    },
                ),
                (
                    5000,
                    "INFO",
                    "deduct_end",
                    vec![("outcome", "committed".into()), ("dur_ms", "5".into())],
                ),
            ];
            for (dt, level, ev, extra) in evs.iter() {
                let l = Line {
                    ts: t0 + d + dt,
                    level,
                    event: ev,
                    oid,
                    req: Some(&r),
                    host: &hosts[h],
                    extra,
                };
                let s = render(f, &l);
                if d > 0 {
                    out.delayed.push(Reverse((l.ts, h, s)));
                } else {
                    out.put(h, &s, true);
                }
            }
        }
    }

    fn race(&mut self, o: &Order) {
        let Order {
            seq,
            t0,
            amount,
            h0,
            ..
        } = *o;
        let oid: &str = &o.oid;
        let nh = self.shared_hosts;
        let solo = h0 >= nh;
        let replay_locks = self.replay_locks;
        let (out, rng, hosts, fmts) = (&mut self.out, &mut self.rng, &self.hosts, &FMTS);
        // A duplicate storm against a healthy payguard: 2-3 requests in flight, one debit.
        self.counts.races += 1;
        let n = 2 + rng.below(2) as usize;
        let mut d = 0i64;
        for k in 0..n {
            let h = if solo { h0 } else { (h0 + k) % nh };
            let f = fmts[rng.below(fmts.len() as u64) as usize];
            let r = format!("r{seq}{k}");
            let mut emit = |dt: i64, level: &str, ev: &str, extra: &[(&str, String)]| {
                let l = Line {
                    ts: t0 + d + dt,
                    level,
                    event: ev,
                    oid,
                    req: Some(&r),
                    host: &hosts[h],
                    extra,
                };
                let s = render(f, &l);
                out.put(h, &s, true);
            };
            emit(0, "INFO", "deduct_start", &[]);
            if k == 0 {
                emit(
                    200,
                    "INFO",
                    "order_cache_set",
                    &[("status", "PREPARE".into())],
                );
                emit(400, "INFO", "lock_acquired", &[("token", "11".into())]);
                emit(
                    6000,
                    "INFO",
                    "deduct_commit",
                    &[
                        ("entry", format!("E{seq}-0")),
                        ("amount", amount.to_string()),
                        ("balance_after", "0".into()),
                    ],
                );
                emit(6100, "INFO", "lock_released", &[("token", "11".into())]);
                emit(
                    6500,
                    "INFO",
                    "deduct_end",
                    &[("outcome", "committed".into()), ("dur_ms", "6".into())],
                );
            } else {
                emit(
                    100,
                    "WARN",
                    "concurrent_inflight",
                    &[("other_req", format!("r{seq}0"))],
                );
                if replay_locks {
                    // Holder k after holder k-1, 250 us apart, all after the committer (6100).
                    let at = 6100 + 250 * k as i64 - d;
                    let token = [("token", (11 + k).to_string())];
                    emit(at, "INFO", "lock_acquired", &token);
                    emit(at + 200, "INFO", "lock_released", &token);
                }
                emit(
                    7000 - d,
                    "INFO",
                    "deduct_replay",
                    &[("entry", format!("E{seq}-0"))],
                );
                emit(
                    7200 - d,
                    "INFO",
                    "deduct_end",
                    &[("outcome", "replayed".into()), ("dur_ms", "7".into())],
                );
            }
            d += 100 + rng.below(2900) as i64;
        }
    }

    /// A normal order: one request, one debit, on one host, in one format.
    fn normal(&mut self, o: &Order) {
        let plain = self.rng.below(10) == 0;
        if plain {
            self.normal_plain(o);
        } else {
            self.normal_request(o);
        }
    }

    /// A normal order in the incident's format: req-less plain text, no date.
    fn normal_plain(&mut self, o: &Order) {
        let Order { t0, amount, h0, .. } = *o;
        let oid: &str = &o.oid;
        let (out, hosts) = (&mut self.out, &self.hosts);
        for (dt, ev, extra) in [
            (
                0i64,
                "order_cache_set",
                vec![("status", "PREPARE".to_string())],
            ),
            (5000, "deduct_commit", vec![("amount", amount.to_string())]),
            (
                6000,
                "deduct_end",
                vec![("outcome", "committed".to_string())],
            ),
        ] {
            let l = Line {
                ts: t0 + dt,
                level: "INFO",
                event: ev,
                oid,
                req: None,
                host: &hosts[h0],
                extra: &extra,
            };
            out.put(h0, &render(Fmt::Plain, &l), true);
        }
    }

    /// A normal order in a dated format with `req`; one in twenty is refunded later.
    fn normal_request(&mut self, o: &Order) {
        let Order {
            seq,
            t0,
            amount,
            h0,
            ..
        } = *o;
        let oid: &str = &o.oid;
        let (out, rng, hosts, fmts) = (&mut self.out, &mut self.rng, &self.hosts, &FMTS);
        let f = fmts[rng.below(fmts.len() as u64) as usize];
        let r = format!("r{seq}");
        let refund = rng.below(20) == 0;
        let evs: Vec<(i64, &str, Fieldset)> = vec![
            (0, "deduct_start", vec![]),
            (300, "order_cache_set", vec![("status", "PREPARE".into())]),
            (500, "lock_acquired", vec![("token", "3".into())]),
            (
                5000,
                "deduct_commit",
                vec![
                    ("entry", format!("E{seq}-0")),
                    ("amount", amount.to_string()),
                    ("balance_after", (amount * 3).to_string()),
                ],
            ),
            (5200, "lock_released", vec![("token", "3".into())]),
            (
                5600,
                "deduct_end",
                vec![("outcome", "committed".into()), ("dur_ms", "5".into())],
            ),
        ];
        for (dt, ev, extra) in &evs {
            let l = Line {
                ts: t0 + dt,
                level: "INFO",
                event: ev,
                oid,
                req: Some(&r),
                host: &hosts[h0],
                extra,
            };
            out.put(h0, &render(f, &l), true);
        }
        if refund {
            let rr = format!("r{seq}refund");
            for (dt, ev, extra) in [
                (40_000i64, "refund_start", vec![]),
                (
                    44_000,
                    "refund_commit",
                    vec![
                        ("entry", format!("F{seq}-0")),
                        ("amount", amount.to_string()),
                    ],
                ),
                (
                    45_000,
                    "refund_end",
                    vec![("outcome", "committed".to_string())],
                ),
            ] {
                let l = Line {
                    ts: t0 + dt,
                    level: "INFO",
                    event: ev,
                    oid,
                    req: Some(&rr),
                    host: &hosts[h0],
                    extra: &extra,
                };
                out.put(h0, &render(f, &l), true);
            }
        }
    }
}
