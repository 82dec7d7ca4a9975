//! Prometheus metrics, in the text exposition format, written by hand: a handful of counters, gauges and
//! fixed-bucket histograms need no library. Names follow Prometheus conventions (`_total` for counters,
//! base units: seconds).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

mod render;

pub use render::render;

/// A histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum: Mutex<f64>,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: Mutex::new(0.0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        *self.sum.lock() += value;
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let separator = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}"
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {total}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", *self.sum.lock());
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BOUNDS: &[f64] = &[
    1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 10000.0,
];

/// Everything the request path records.
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    durations: Mutex<BTreeMap<&'static str, Histogram>>,
    pub changes_pushed: AtomicU64,
    pub changes_pulled: AtomicU64,
    pub conflicts: AtomicU64,
    pub push_batch_size: Histogram,
    pub notify_delivery: Histogram,
    pub overloaded: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            durations: Mutex::new(BTreeMap::new()),
            changes_pushed: AtomicU64::new(0),
            changes_pulled: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            push_batch_size: Histogram::new(BATCH_BOUNDS),
            notify_delivery: Histogram::new(LATENCY_BOUNDS),
            overloaded: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
        *self.requests.lock().entry((route, status)).or_default() += 1;
        self.durations
            .lock()
            .entry(route)
            .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(elapsed.as_secs_f64());
    }
}

/// What `/metrics` shows besides the counters of `Metrics`: read from the rest of the server by whoever
/// renders (`Shared::metrics_snapshot`), so that this module names none of it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub inflight_body_bytes: u64,
    /// Large bodies refused: over the user's share, over the server's budget.
    pub body_budget_refusals: (u64, u64),
    pub http_connections: u64,
    /// WebSockets, and the users that have one.
    pub sockets: (u64, u64),
    /// SSE streams, and the users that have one.
    pub streams: (u64, u64),
    /// Users with any real-time connection.
    pub realtime_users: u64,
    pub notifications_queued: u64,
    pub notifications_coalesced: u64,
    pub notifications_dropped: u64,
    pub slow_consumers_closed: u64,
    /// Billing gate outcomes (active, inactive, failed open, from the cache); `None`: the gate is off.
    pub billing_checks: Option<[u64; 4]>,
    /// JWKS refreshes: succeeded, failed.
    pub jwks_refreshes: (u64, u64),
    pub jwks_keys: u64,
    pub pool_in_use: u64,
    pub pool_idle: u64,
    pub pool_max: u64,
    pub pool_waiting: u64,
    pub rows_pruned: u64,
    /// Log reads answered from memory, from the database.
    pub log_reads: (u64, u64),
    /// Token checks answered by the cache, by a signature check.
    pub token_checks: (u64, u64),
    pub times_beyond_skew: u64,
    /// Push groups committed, failed.
    pub push_groups: (u64, u64),
    /// Pushes taken into a group: written, bounced.
    pub grouped_pushes: (u64, u64),
    pub known_stamps_users: u64,
}

#[cfg(test)]
mod tests;
