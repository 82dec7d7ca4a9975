//! `render`: every metric family in the Prometheus text format, in a fixed order. Each family's name, type
//! and help text is a constant below, so that `render` reads as the list of families and their values.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Histogram, Metrics, Snapshot};

/// Renders every metric: `metrics`' own and those of `snapshot`.
pub(crate) fn render(metrics: &Metrics, snapshot: &Snapshot) -> String {
    let mut text = Text(String::with_capacity(8 * 1024));
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let s = snapshot;

    text.http_requests(metrics);
    text.http_durations(metrics);
    text.one(&HTTP_OVERLOADED, load(&metrics.overloaded));
    text.one(&INFLIGHT_BODY_BYTES, s.inflight_body_bytes);
    let (over_user, over_server) = s.body_budget_refusals;
    text.by(
        &BODY_BUDGET_REFUSALS,
        &[("user", over_user), ("server", over_server)],
    );
    text.one(&HTTP_CONNECTIONS, s.http_connections);

    text.one(&CHANGES_PUSHED, load(&metrics.changes_pushed));
    text.one(&CHANGES_PULLED, load(&metrics.changes_pulled));
    text.one(&CONFLICTS, load(&metrics.conflicts));
    text.histogram(&PUSH_BATCH_SIZE, &metrics.push_batch_size);

    let (sockets, socket_users) = s.sockets;
    let (streams, stream_users) = s.streams;
    text.by(
        &REALTIME_CONNECTIONS,
        &[("websocket", sockets), ("sse", streams)],
    );
    let users = [
        ("websocket", socket_users),
        ("sse", stream_users),
        ("all", s.realtime_users),
    ];
    text.by(&REALTIME_USERS, &users);
    let notifications = [
        ("queued", s.notifications_queued),
        ("coalesced", s.notifications_coalesced),
        ("dropped", s.notifications_dropped),
    ];
    text.by(&NOTIFICATIONS, &notifications);
    text.one(&SLOW_CONSUMERS_CLOSED, s.slow_consumers_closed);
    text.histogram(&NOTIFY_DELIVERY, &metrics.notify_delivery);

    text.billing_checks(s.billing_checks);
    let (refreshed, failed) = s.jwks_refreshes;
    text.by(&JWKS_REFRESHES, &[("ok", refreshed), ("failed", failed)]);
    text.one(&JWKS_KEYS, s.jwks_keys);

    let pool = [
        ("in_use", s.pool_in_use),
        ("idle", s.pool_idle),
        ("max", s.pool_max),
    ];
    text.by(&DB_POOL_CONNECTIONS, &pool);
    text.one(&DB_POOL_WAITING, s.pool_waiting);
    text.one(&LOG_ROWS_PRUNED, s.rows_pruned);
    let (from_memory, from_database) = s.log_reads;
    text.by(
        &LOG_READS,
        &[("memory", from_memory), ("database", from_database)],
    );
    let (cached, verified) = s.token_checks;
    text.by(&TOKEN_CHECKS, &[("cache", cached), ("signature", verified)]);
    text.one(&CHANGES_BEYOND_FUTURE_SKEW, s.times_beyond_skew);
    let (committed, failed) = s.push_groups;
    text.by(
        &PUSH_GROUPS,
        &[("committed", committed), ("failed", failed)],
    );
    let (written, bounced) = s.grouped_pushes;
    text.by(
        &GROUPED_PUSHES,
        &[("written", written), ("bounced", bounced)],
    );
    text.one(&KNOWN_STAMPS_USERS, s.known_stamps_users);
    text.0
}

/// One metric family: its name, its type, its help text, and the label its samples differ by (if any).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    label: &'static str,
}

/// The text being rendered. Writing to a `String` cannot fail, so `writeln!`'s result is ignored.
struct Text(String);

impl Text {
    fn head(&mut self, family: &Family) {
        let Family {
            name, kind, help, ..
        } = family;
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A family of one sample without labels.
    fn one(&mut self, family: &Family, value: u64) {
        self.head(family);
        let _ = writeln!(self.0, "{} {value}", family.name);
    }

    /// A family with one sample per value of its label.
    fn by(&mut self, family: &Family, samples: &[(&str, u64)]) {
        self.head(family);
        let Family { name, label, .. } = family;
        for (value_of_label, value) in samples {
            let _ = writeln!(self.0, "{name}{{{label}=\"{value_of_label}\"}} {value}");
        }
    }

    /// A histogram without labels.
    fn histogram(&mut self, family: &Family, histogram: &Histogram) {
        self.head(family);
        histogram.render(&mut self.0, family.name, "");
    }

    /// The billing gate's outcomes, or a single `disabled` sample when the gate is off.
    fn billing_checks(&mut self, checks: Option<[u64; 4]>) {
        match checks {
            Some([active, inactive, failed_open, cache_hits]) => {
                let outcomes = [
                    ("active", active),
                    ("inactive", inactive),
                    ("failed_open", failed_open),
                    ("cache", cache_hits),
                ];
                self.by(&BILLING_CHECKS, &outcomes)
            }
            None => self.by(&BILLING_CHECKS, &[("disabled", 0)]),
        }
    }

    fn http_requests(&mut self, metrics: &Metrics) {
        self.head(&HTTP_REQUESTS);
        for (route, status, count) in metrics.request_counts() {
            let name = HTTP_REQUESTS.name;
            let _ = writeln!(
                self.0,
                "{name}{{route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
    }

    fn http_durations(&mut self, metrics: &Metrics) {
        self.head(&HTTP_REQUEST_DURATION);
        for (route, histogram) in metrics.route_durations() {
            let labels = format!("route=\"{route}\"");
            histogram.render(&mut self.0, HTTP_REQUEST_DURATION.name, &labels);
        }
    }
}

const COUNTER: &str = "counter";
const GAUGE: &str = "gauge";
const HISTOGRAM: &str = "histogram";

const HTTP_REQUESTS: Family = Family {
    name: "mana_sync_http_requests_total",
    kind: COUNTER,
    help: "HTTP requests by route and status.",
    label: "route",
};
const HTTP_REQUEST_DURATION: Family = Family {
    name: "mana_sync_http_request_duration_seconds",
    kind: HISTOGRAM,
    help: "Time to produce the response head, by route.",
    label: "route",
};
const HTTP_OVERLOADED: Family = Family {
    name: "mana_sync_http_overloaded_total",
    kind: COUNTER,
    help: "Requests refused with 503 because the concurrency limit was reached.",
    label: "",
};
const INFLIGHT_BODY_BYTES: Family = Family {
    name: "mana_sync_inflight_body_bytes",
    kind: GAUGE,
    help: "Bytes of large request bodies being read or worked on (bounded by MAX_INFLIGHT_BODY_BYTES).",
    label: "",
};
const BODY_BUDGET_REFUSALS: Family = Family {
    name: "mana_sync_body_budget_refusals_total",
    kind: COUNTER,
    help: "Large request bodies refused: over the user's share (429) or the server's budget (503).",
    label: "scope",
};
const HTTP_CONNECTIONS: Family = Family {
    name: "mana_sync_http_connections",
    kind: GAUGE,
    help: "Open HTTP connections.",
    label: "",
};
const CHANGES_PUSHED: Family = Family {
    name: "mana_sync_changes_pushed_total",
    kind: COUNTER,
    help: "Changes received in pushes.",
    label: "",
};
const CHANGES_PULLED: Family = Family {
    name: "mana_sync_changes_pulled_total",
    kind: COUNTER,
    help: "Changes returned by pulls, pushes and streams.",
    label: "",
};
const CONFLICTS: Family = Family {
    name: "mana_sync_conflicts_total",
    kind: COUNTER,
    help: "Pushed fields that lost to a newer stored value.",
    label: "",
};
const PUSH_BATCH_SIZE: Family = Family {
    name: "mana_sync_push_batch_size",
    kind: HISTOGRAM,
    help: "Changes per push.",
    label: "",
};
const REALTIME_CONNECTIONS: Family = Family {
    name: "mana_sync_realtime_connections",
    kind: GAUGE,
    help: "Open real-time connections by kind.",
    label: "kind",
};
const REALTIME_USERS: Family = Family {
    name: "mana_sync_realtime_users",
    kind: GAUGE,
    help: "Users with at least one real-time connection, by kind (all: any kind).",
    label: "kind",
};
const NOTIFICATIONS: Family = Family {
    name: "mana_sync_notifications_total",
    kind: COUNTER,
    help: "Notification hints by outcome.",
    label: "outcome",
};
const SLOW_CONSUMERS_CLOSED: Family = Family {
    name: "mana_sync_slow_consumers_closed_total",
    kind: COUNTER,
    help: "Connections closed because they stopped reading.",
    label: "",
};
const NOTIFY_DELIVERY: Family = Family {
    name: "mana_sync_notify_delivery_seconds",
    kind: HISTOGRAM,
    help: "From a change's commit to its hint being written to a socket or stream.",
    label: "",
};
const BILLING_CHECKS: Family = Family {
    name: "mana_sync_billing_checks_total",
    kind: COUNTER,
    help: "Billing gate outcomes (cache: answered from the cache).",
    label: "outcome",
};
const JWKS_REFRESHES: Family = Family {
    name: "mana_sync_jwks_refreshes_total",
    kind: COUNTER,
    help: "JWKS refreshes by outcome.",
    label: "outcome",
};
const JWKS_KEYS: Family = Family {
    name: "mana_sync_jwks_keys",
    kind: GAUGE,
    help: "Signing keys currently trusted.",
    label: "",
};
const DB_POOL_CONNECTIONS: Family = Family {
    name: "mana_sync_db_pool_connections",
    kind: GAUGE,
    help: "Database pool connections by state.",
    label: "state",
};
const DB_POOL_WAITING: Family = Family {
    name: "mana_sync_db_pool_waiting",
    kind: GAUGE,
    help: "Requests waiting for a database connection.",
    label: "",
};
const LOG_ROWS_PRUNED: Family = Family {
    name: "mana_sync_log_rows_pruned_total",
    kind: COUNTER,
    help: "Log rows removed by compaction.",
    label: "",
};
const LOG_READS: Family = Family {
    name: "mana_sync_log_reads_total",
    kind: COUNTER,
    help: "Log reads (pulls, stream pages) by where their answer came from.",
    label: "source",
};
const TOKEN_CHECKS: Family = Family {
    name: "mana_sync_token_checks_total",
    kind: COUNTER,
    help: "Bearer tokens checked, by whether a cached verification answered.",
    label: "source",
};
const CHANGES_BEYOND_FUTURE_SKEW: Family = Family {
    name: "mana_sync_changes_beyond_future_skew_total",
    kind: COUNTER,
    help: "Pushed changes with a timestamp further ahead than MAX_FUTURE_SKEW_SECS (ordered at that bound).",
    label: "",
};
const PUSH_GROUPS: Family = Family {
    name: "mana_sync_push_groups_total",
    kind: COUNTER,
    help: "Transactions that wrote small pushes of several users together, by outcome.",
    label: "outcome",
};
const GROUPED_PUSHES: Family = Family {
    name: "mana_sync_grouped_pushes_total",
    kind: COUNTER,
    help: "Pushes taken into a group: answered by it, or handed back to run alone.",
    label: "outcome",
};
const KNOWN_STAMPS_USERS: Family = Family {
    name: "mana_sync_known_stamps_users",
    kind: GAUGE,
    help: "Users whose newest stamp this instance keeps in memory.",
    label: "",
};
