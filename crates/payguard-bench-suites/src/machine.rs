//! What machine a run was measured on.
//!
//! Numbers from this crate mean nothing without the core count beside them (two
//! cores cannot show 16-thread scaling), so every report carries this record.

use serde::Serialize;

/// The facts about the host that change how the numbers read.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `std::thread::available_parallelism()`, what `nproc` prints.
    pub cpus: usize,
    /// The `model name` line of `/proc/cpuinfo`, or "unknown".
    pub cpu_model: String,
    pub os: &'static str,
    pub arch: &'static str,
    /// `debug` or `release`: a debug build is not a measurement.
    pub profile: &'static str,
}

impl Machine {
    pub fn detect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }

    /// One line for the top of a report.
    pub fn summary(&self) -> String {
        format!(
            "{} CPUs ({}), {}/{}, {} build",
            self.cpus, self.cpu_model, self.os, self.arch, self.profile
        )
    }
}
