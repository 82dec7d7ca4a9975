//! `render` against a golden text written before `render` was split into one writer per family, so that the
//! split (and any later change) is shown to keep `/metrics` byte-identical.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{render, Metrics, RouteLabel, Snapshot, ROUTES};

/// Every field different, so that a value written under the wrong name shows.
fn fixed_snapshot() -> Snapshot {
    Snapshot {
        inflight_body_bytes: 1,
        body_budget_refusals: (2, 3),
        http_connections: 4,
        sockets: (5, 6),
        streams: (7, 8),
        realtime_users: 9,
        notifications_queued: 10,
        notifications_coalesced: 11,
        notifications_dropped: 12,
        slow_consumers_closed: 13,
        billing_checks: Some([14, 15, 16, 17]),
        jwks_refreshes: (18, 19),
        jwks_keys: 20,
        pool_in_use: 21,
        pool_idle: 22,
        pool_max: 23,
        pool_waiting: 24,
        rows_pruned: 25,
        log_reads: (26, 27),
        token_checks: (28, 29),
        times_beyond_skew: 30,
        push_groups: (31, 32),
        grouped_pushes: (33, 34),
        known_stamps_users: 35,
    }
}

fn fixed_metrics() -> Metrics {
    let metrics = Metrics::default();
    metrics.request(RouteLabel::Push, 200, Duration::from_millis(3));
    metrics.request(RouteLabel::Push, 200, Duration::from_millis(30));
    metrics.request(RouteLabel::Push, 400, Duration::from_micros(200));
    metrics.request(RouteLabel::Pull, 200, Duration::from_secs(20));
    metrics.changes_pushed.store(36, Ordering::Relaxed);
    metrics.changes_pulled.store(37, Ordering::Relaxed);
    metrics.conflicts.store(38, Ordering::Relaxed);
    metrics.overloaded.store(39, Ordering::Relaxed);
    metrics.push_batch_size.observe(1.0);
    metrics.push_batch_size.observe(7.0);
    metrics.push_batch_size.observe(20000.0);
    metrics.notify_delivery.observe(0.0125);
    metrics
}

#[test]
fn render_matches_the_golden_text() {
    let rendered = render(&fixed_metrics(), &fixed_snapshot());
    assert_eq!(rendered, include_str!("golden.prom"));
}

#[test]
fn render_without_billing_shows_it_disabled() {
    let snapshot = Snapshot {
        billing_checks: None,
        ..fixed_snapshot()
    };
    let rendered = render(&Metrics::default(), &snapshot);
    assert!(rendered.contains("mana_sync_billing_checks_total{outcome=\"disabled\"} 0\n"));
    assert!(!rendered.contains("mana_sync_http_requests_total{"));
}

#[test]
fn requests_recorded_from_many_threads_are_all_counted() {
    let metrics = Metrics::default();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..1000 {
                    metrics.request(RouteLabel::Ws, 101, Duration::from_millis(1));
                }
            });
        }
    });
    let rendered = render(&metrics, &Snapshot::default());
    assert!(rendered.contains("mana_sync_http_requests_total{route=\"ws\",status=\"101\"} 4000\n"));
    assert!(rendered.contains("mana_sync_http_request_duration_seconds_count{route=\"ws\"} 4000\n"));
    assert!(
        !rendered.contains("route=\"push\""),
        "routes without requests are not listed"
    );
}

#[test]
fn every_route_label_indexes_its_own_row_and_the_rows_are_in_label_order() {
    for (row, route) in ROUTES.iter().enumerate() {
        assert_eq!(*route as usize, row, "{route:?}");
    }
    let labels: Vec<&str> = ROUTES.iter().map(|route| route.as_str()).collect();
    let mut sorted = labels.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(labels, sorted, "sorted by label, each once");
}
