//! CPU time (user + system) of this process or of the calling thread, from
//! `/proc`: the benchmarks' figure that other work on a shared machine moves
//! least.
//!
//! `bench http` runs the server in its own process, so while wrk (another
//! process) drives a row, this process's CPU is the server's: CPU per request
//! is the figure to compare between builds on a shared machine, where other
//! work moves requests/s but not it. During our own client's rows the same
//! figure also holds the client's CPU. Linux only; elsewhere it is absent.

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`): 100 on every
/// architecture Linux runs payguard on, whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// CPU seconds this process (every thread) has used so far, or `None` off Linux.
pub fn process_cpu_secs() -> Option<f64> {
    secs_of("/proc/self/stat")
}

/// CPU seconds the calling thread has used so far, or `None` off Linux
/// (`bench engine`'s store-only runs, which run on one thread).
pub fn thread_cpu_secs() -> Option<f64> {
    secs_of("/proc/thread-self/stat")
}

fn secs_of(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    Some(ticks(&stat)? as f64 / USER_HZ)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command
/// name (field 2) is in parentheses and may hold spaces or parentheses, so
/// fields are counted from the last `)`.
fn ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Microseconds of CPU per request (or op, or payment) between two readings.
pub fn us_per_request(before: Option<f64>, after: Option<f64>, requests: u64) -> Option<f64> {
    Some((after? - before?) * 1e6 / requests.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_past_a_name_with_spaces_and_parens() {
        // A real line's first 17 fields, with the name changed to a hostile one.
        let line = "8515 (pay guard) (x)) S 8510 8515 8510 0 -1 4194560 1200 0 0 0 4711 289 0 0 20";
        assert_eq!(ticks(line), Some(4711 + 289));
        assert_eq!(ticks("8515 (payguard"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_and_thread_have_a_reading() {
        assert!(process_cpu_secs().is_some());
        assert!(thread_cpu_secs().is_some());
    }

    #[test]
    fn per_request() {
        assert_eq!(us_per_request(Some(1.0), Some(1.5), 1000), Some(500.0));
        assert_eq!(us_per_request(None, Some(1.5), 1000), None);
    }
}
