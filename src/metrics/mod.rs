//! Prometheus metrics, in the text exposition format, written by hand: a handful of counters, gauges and
//! fixed-bucket histograms need no library. Names follow Prometheus conventions (`_total` for counters,
//! base units: seconds).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

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

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter family with one sample per value of one label.
fn labelled(out: &mut String, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
    family(out, name, "counter", help);
    for (value_of_label, value) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value_of_label}\"}} {value}");
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

/// Renders every metric: `metrics`' own and those of `snapshot`.
pub fn render(metrics: &Metrics, snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

    family(
        &mut out,
        "mana_sync_http_requests_total",
        "counter",
        "HTTP requests by route and status.",
    );
    for ((route, status), count) in metrics.requests.lock().iter() {
        let _ = writeln!(
            out,
            "mana_sync_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
        );
    }
    family(
        &mut out,
        "mana_sync_http_request_duration_seconds",
        "histogram",
        "Time to produce the response head, by route.",
    );
    for (route, histogram) in metrics.durations.lock().iter() {
        histogram.render(
            &mut out,
            "mana_sync_http_request_duration_seconds",
            &format!("route=\"{route}\""),
        );
    }
    single(
        &mut out,
        "mana_sync_http_overloaded_total",
        "counter",
        "Requests refused with 503 because the concurrency limit was reached.",
        load(&metrics.overloaded),
    );
    single(
        &mut out,
        "mana_sync_inflight_body_bytes",
        "gauge",
        "Bytes of large request bodies being read or worked on (bounded by MAX_INFLIGHT_BODY_BYTES).",
        snapshot.inflight_body_bytes,
    );
    let (over_user, over_server) = snapshot.body_budget_refusals;
    labelled(
        &mut out,
        "mana_sync_body_budget_refusals_total",
        "Large request bodies refused: over the user's share (429) or the server's budget (503).",
        "scope",
        &[("user", over_user), ("server", over_server)],
    );
    single(
        &mut out,
        "mana_sync_http_connections",
        "gauge",
        "Open HTTP connections.",
        snapshot.http_connections,
    );

    single(
        &mut out,
        "mana_sync_changes_pushed_total",
        "counter",
        "Changes received in pushes.",
        load(&metrics.changes_pushed),
    );
    single(
        &mut out,
        "mana_sync_changes_pulled_total",
        "counter",
        "Changes returned by pulls, pushes and streams.",
        load(&metrics.changes_pulled),
    );
    single(
        &mut out,
        "mana_sync_conflicts_total",
        "counter",
        "Pushed fields that lost to a newer stored value.",
        load(&metrics.conflicts),
    );
    family(
        &mut out,
        "mana_sync_push_batch_size",
        "histogram",
        "Changes per push.",
    );
    metrics
        .push_batch_size
        .render(&mut out, "mana_sync_push_batch_size", "");

    let (sockets, socket_users) = snapshot.sockets;
    let (streams, stream_users) = snapshot.streams;
    let users = snapshot.realtime_users;
    family(
        &mut out,
        "mana_sync_realtime_connections",
        "gauge",
        "Open real-time connections by kind.",
    );
    let _ = writeln!(
        out,
        "mana_sync_realtime_connections{{kind=\"websocket\"}} {sockets}"
    );
    let _ = writeln!(
        out,
        "mana_sync_realtime_connections{{kind=\"sse\"}} {streams}"
    );
    family(
        &mut out,
        "mana_sync_realtime_users",
        "gauge",
        "Users with at least one real-time connection, by kind (all: any kind).",
    );
    let _ = writeln!(
        out,
        "mana_sync_realtime_users{{kind=\"websocket\"}} {socket_users}"
    );
    let _ = writeln!(
        out,
        "mana_sync_realtime_users{{kind=\"sse\"}} {stream_users}"
    );
    let _ = writeln!(out, "mana_sync_realtime_users{{kind=\"all\"}} {users}");
    family(
        &mut out,
        "mana_sync_notifications_total",
        "counter",
        "Notification hints by outcome.",
    );
    let _ = writeln!(
        out,
        "mana_sync_notifications_total{{outcome=\"queued\"}} {}",
        snapshot.notifications_queued
    );
    let _ = writeln!(
        out,
        "mana_sync_notifications_total{{outcome=\"coalesced\"}} {}",
        snapshot.notifications_coalesced
    );
    let _ = writeln!(
        out,
        "mana_sync_notifications_total{{outcome=\"dropped\"}} {}",
        snapshot.notifications_dropped
    );
    single(
        &mut out,
        "mana_sync_slow_consumers_closed_total",
        "counter",
        "Connections closed because they stopped reading.",
        snapshot.slow_consumers_closed,
    );
    family(
        &mut out,
        "mana_sync_notify_delivery_seconds",
        "histogram",
        "From a change's commit to its hint being written to a socket or stream.",
    );
    metrics
        .notify_delivery
        .render(&mut out, "mana_sync_notify_delivery_seconds", "");

    family(
        &mut out,
        "mana_sync_billing_checks_total",
        "counter",
        "Billing gate outcomes (cache: answered from the cache).",
    );
    match snapshot.billing_checks {
        Some([active, inactive, failed_open, cache_hits]) => {
            for (outcome, value) in [
                ("active", active),
                ("inactive", inactive),
                ("failed_open", failed_open),
                ("cache", cache_hits),
            ] {
                let _ = writeln!(
                    out,
                    "mana_sync_billing_checks_total{{outcome=\"{outcome}\"}} {value}"
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "mana_sync_billing_checks_total{{outcome=\"disabled\"}} 0"
            );
        }
    }

    let (refreshed, failed) = snapshot.jwks_refreshes;
    family(
        &mut out,
        "mana_sync_jwks_refreshes_total",
        "counter",
        "JWKS refreshes by outcome.",
    );
    let _ = writeln!(
        out,
        "mana_sync_jwks_refreshes_total{{outcome=\"ok\"}} {refreshed}"
    );
    let _ = writeln!(
        out,
        "mana_sync_jwks_refreshes_total{{outcome=\"failed\"}} {failed}"
    );
    single(
        &mut out,
        "mana_sync_jwks_keys",
        "gauge",
        "Signing keys currently trusted.",
        snapshot.jwks_keys,
    );

    family(
        &mut out,
        "mana_sync_db_pool_connections",
        "gauge",
        "Database pool connections by state.",
    );
    let _ = writeln!(
        out,
        "mana_sync_db_pool_connections{{state=\"in_use\"}} {}",
        snapshot.pool_in_use
    );
    let _ = writeln!(
        out,
        "mana_sync_db_pool_connections{{state=\"idle\"}} {}",
        snapshot.pool_idle
    );
    let _ = writeln!(
        out,
        "mana_sync_db_pool_connections{{state=\"max\"}} {}",
        snapshot.pool_max
    );
    single(
        &mut out,
        "mana_sync_db_pool_waiting",
        "gauge",
        "Requests waiting for a database connection.",
        snapshot.pool_waiting,
    );
    single(
        &mut out,
        "mana_sync_log_rows_pruned_total",
        "counter",
        "Log rows removed by compaction.",
        snapshot.rows_pruned,
    );
    let (from_memory, from_database) = snapshot.log_reads;
    labelled(
        &mut out,
        "mana_sync_log_reads_total",
        "Log reads (pulls, stream pages) by where their answer came from.",
        "source",
        &[("memory", from_memory), ("database", from_database)],
    );
    let (cached, verified) = snapshot.token_checks;
    labelled(
        &mut out,
        "mana_sync_token_checks_total",
        "Bearer tokens checked, by whether a cached verification answered.",
        "source",
        &[("cache", cached), ("signature", verified)],
    );
    single(
        &mut out,
        "mana_sync_changes_beyond_future_skew_total",
        "counter",
        "Pushed changes with a timestamp further ahead than MAX_FUTURE_SKEW_SECS (ordered at that bound).",
        snapshot.times_beyond_skew,
    );
    let (committed, failed) = snapshot.push_groups;
    let (written, bounced) = snapshot.grouped_pushes;
    labelled(
        &mut out,
        "mana_sync_push_groups_total",
        "Transactions that wrote small pushes of several users together, by outcome.",
        "outcome",
        &[("committed", committed), ("failed", failed)],
    );
    labelled(
        &mut out,
        "mana_sync_grouped_pushes_total",
        "Pushes taken into a group: answered by it, or handed back to run alone.",
        "outcome",
        &[("written", written), ("bounced", bounced)],
    );
    single(
        &mut out,
        "mana_sync_known_stamps_users",
        "gauge",
        "Users whose newest stamp this instance keeps in memory.",
        snapshot.known_stamps_users,
    );
    out
}

#[cfg(test)]
mod tests;
