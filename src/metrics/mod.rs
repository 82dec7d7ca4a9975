//! Prometheus metrics, in the text exposition format, written by hand: a handful of counters, gauges and
//! fixed-bucket histograms need no library. Names follow Prometheus conventions (`_total` for counters,
//! base units: seconds).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod render;

pub(crate) use render::render;

/// A histogram with fixed upper bounds.
/// Lock-free: every field is an atomic, the sum an `f64` kept as its bits.
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0.0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        let add = |bits: u64| Some((f64::from_bits(bits) + value).to_bits());
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, add);
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
        let sum = f64::from_bits(self.sum_bits.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
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
///
/// Lock-free: requests are counted in fixed arrays of atomics indexed by route (`ROUTES`) and status, so
/// that recording a request never waits for another request or for a render of `/metrics`.
pub struct Metrics {
    /// `ROUTES.len()` rows of `STATUSES` counters: row `route`, column `status - FIRST_STATUS`.
    requests: Vec<AtomicU64>,
    /// One histogram per route of `ROUTES`.
    durations: Vec<Histogram>,
    pub(crate) changes_pushed: AtomicU64,
    pub(crate) changes_pulled: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) push_batch_size: Histogram,
    pub(crate) notify_delivery: Histogram,
    pub(crate) overloaded: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: (0..ROUTES.len() * STATUSES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            durations: ROUTES
                .iter()
                .map(|_| Histogram::new(LATENCY_BOUNDS))
                .collect(),
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
    /// Records one request under `route` and `status` (100 to 999, as HTTP status codes are).
    pub(crate) fn request(&self, route: RouteLabel, status: u16, elapsed: Duration) {
        let row = route as usize;
        let column = usize::from(status.clamp(FIRST_STATUS, LAST_STATUS) - FIRST_STATUS);
        self.requests[row * STATUSES + column].fetch_add(1, Ordering::Relaxed);
        self.durations[row].observe(elapsed.as_secs_f64());
    }

    /// Requests counted so far: (route, status, count) for every count above zero, by route, then status.
    fn request_counts(&self) -> impl Iterator<Item = (&'static str, u16, u64)> + '_ {
        self.requests.iter().enumerate().filter_map(|(i, count)| {
            let count = count.load(Ordering::Relaxed);
            let status = FIRST_STATUS + (i % STATUSES) as u16;
            (count > 0).then(|| (ROUTES[i / STATUSES].as_str(), status, count))
        })
    }

    /// The duration histograms of the routes that have seen a request, by route.
    fn route_durations(&self) -> impl Iterator<Item = (&'static str, &Histogram)> + '_ {
        let seen =
            |(_, histogram): &(&str, &Histogram)| histogram.count.load(Ordering::Relaxed) > 0;
        let labels = ROUTES.iter().map(|route| route.as_str());
        labels.zip(&self.durations).filter(seen)
    }
}

/// Declares `RouteLabel`, its label text and `ROUTES` (every variant, in discriminant order) from one list.
macro_rules! route_labels {
    ($($(#[$doc:meta])* $variant:ident => $label:literal,)*) => {
        /// The label a request is recorded under (`http`'s router gives each request one). The discriminant
        /// indexes the counters; the variants are in the order of their labels, which is the order
        /// `/metrics` lists them in.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum RouteLabel {
            $($(#[$doc])* $variant,)*
        }

        impl RouteLabel {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(RouteLabel::$variant => $label,)*
                }
            }
        }

        /// Every label, in discriminant order.
        const ROUTES: &[RouteLabel] = &[$(RouteLabel::$variant,)*];
    };
}

route_labels! {
    Health => "health",
    Metrics => "metrics",
    /// Anything that is not one of the routes (404, 405, a bad app id).
    Other => "other",
    Preflight => "preflight",
    Pull => "pull",
    Push => "push",
    Stream => "stream",
    UnifiedStream => "unified_stream",
    Ws => "ws",
    WsApp => "ws_app",
}

const FIRST_STATUS: u16 = 100;
const LAST_STATUS: u16 = 999;
const STATUSES: usize = (LAST_STATUS - FIRST_STATUS + 1) as usize;

/// What `/metrics` shows besides the counters of `Metrics`: read from the rest of the server by whoever
/// renders (`Shared::metrics_snapshot`), so that this module names none of it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub(crate) inflight_body_bytes: u64,
    /// Large bodies refused: over the user's share, over the server's budget.
    pub(crate) body_budget_refusals: (u64, u64),
    pub(crate) http_connections: u64,
    /// WebSockets, and the users that have one.
    pub(crate) sockets: (u64, u64),
    /// SSE streams, and the users that have one.
    pub(crate) streams: (u64, u64),
    /// Users with any real-time connection.
    pub(crate) realtime_users: u64,
    pub(crate) notifications_queued: u64,
    pub(crate) notifications_coalesced: u64,
    pub(crate) notifications_dropped: u64,
    pub(crate) slow_consumers_closed: u64,
    /// Billing gate outcomes (active, inactive, failed open, from the cache); `None`: the gate is off.
    pub(crate) billing_checks: Option<[u64; 4]>,
    /// JWKS refreshes: succeeded, failed.
    pub(crate) jwks_refreshes: (u64, u64),
    pub(crate) jwks_keys: u64,
    pub(crate) pool_in_use: u64,
    pub(crate) pool_idle: u64,
    pub(crate) pool_max: u64,
    pub(crate) pool_waiting: u64,
    pub(crate) rows_pruned: u64,
    /// Log reads answered from memory, from the database.
    pub(crate) log_reads: (u64, u64),
    /// Token checks answered by the cache, by a signature check.
    pub(crate) token_checks: (u64, u64),
    pub(crate) times_beyond_skew: u64,
    /// Push groups committed, failed.
    pub(crate) push_groups: (u64, u64),
    /// Pushes taken into a group: written, bounced.
    pub(crate) grouped_pushes: (u64, u64),
    pub(crate) known_stamps_users: u64,
}

#[cfg(test)]
mod tests;
