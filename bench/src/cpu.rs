//! CPU time spent over a measured window, split between this process (the in-process server and the load
//! generator) and the cluster's PostgreSQL processes, from `/proc`. On a machine whose cores are all busy,
//! throughput is CPU per request: this says whose CPU a request costs.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ; 100 on Linux everywhere that matters).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds of this process and of one cluster's processes at one moment.
#[derive(Clone, Copy, Default)]
pub struct CpuSample {
    pub own: f64,
    pub postgres: f64,
}

impl std::ops::Sub for CpuSample {
    type Output = CpuSample;
    fn sub(self, earlier: CpuSample) -> CpuSample {
        CpuSample {
            own: self.own - earlier.own,
            postgres: self.postgres - earlier.postgres,
        }
    }
}

/// Samples the CPU time of this process and of the postmaster whose `postmaster.pid` is in `pgdata`, with
/// its children (backends that exit inside a window are missed; the scenarios keep their connections).
#[derive(Clone)]
pub struct CpuMeter {
    pgdata: PathBuf,
}

impl CpuMeter {
    pub fn new(pgdata: &Path) -> CpuMeter {
        CpuMeter {
            pgdata: pgdata.to_path_buf(),
        }
    }

    pub fn sample(&self) -> CpuSample {
        let own = stat_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
            .map_or(0, |(_, ticks)| ticks);
        let postmaster: Option<u32> = std::fs::read_to_string(self.pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok());
        let mut postgres = 0;
        if let (Some(postmaster), Ok(entries)) = (postmaster, std::fs::read_dir("/proc")) {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                if let Some((parent, ticks)) = stat_ticks(&stat) {
                    if pid == postmaster || parent == postmaster {
                        postgres += ticks;
                    }
                }
            }
        }
        CpuSample {
            own: own as f64 / TICKS_PER_SECOND,
            postgres: postgres as f64 / TICKS_PER_SECOND,
        }
    }

    /// The CPU spent between `from` and `to` (sampled at those instants by a task of its own).
    pub fn over(&self, from: Instant, to: Instant) -> tokio::task::JoinHandle<CpuSample> {
        let meter = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            let first = meter.sample();
            tokio::time::sleep_until(to.into()).await;
            meter.sample() - first
        })
    }
}

/// The parent pid and utime + stime of one `/proc/<pid>/stat` line (the command may contain spaces and
/// parentheses, so fields are counted after the last `)`).
fn stat_ticks(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ppid(1) … utime(11) stime(12).
    let parent = fields.get(1)?.parse().ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((parent, user + system))
}

/// Microseconds of CPU per unit of work, for the report.
pub fn micros_per(seconds: f64, units: f64) -> f64 {
    if units > 0.0 {
        seconds * 1e6 / units
    } else {
        f64::NAN
    }
}
