//! Scenario `pull`: latency of 1,000-row pages (`GET /sync/{app}/pull?collection=…&since=<log cursor>&limit=1000`)
//! from a table of `rows` rows spread over `rows / rows_per_user` users (rows interleaved in time, as many
//! users writing at once produce them), against the same SQL (the server's lock statement + page query)
//! run directly as the same ordinary role over the same Unix socket.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::*;
use crate::hist::{ms, Histogram};

pub struct Args {
    pub runs: usize,
    pub rows: usize,
    pub rows_per_user: usize,
    pub requests: usize,
    pub warm_requests: usize,
}

const BASE_UNIX: u64 = 1_735_689_600; // 2025-01-01T00:00:00Z

/// The server's statements (src/store/mod.rs, LOCK_SHARED and PULL_PAGE), verbatim.
fn lock_shared() -> String {
    format!(
        "SELECT set_config('app.current_user_id', $1, true), pg_advisory_xact_lock_shared({USER_LOCK_CLASS}, hashtext($1))"
    )
}
const PULL_PAGE: &str = concat!(
    "SELECT id::text, table_name, record_id, op, data, field_meta, created_at, schema_version, actor, origin, space_id ",
    "FROM sync_changes WHERE user_id = $1 AND app_id = $2 AND table_name = $3 AND created_at > $4 ",
    "AND ($5 = '' OR client_id <> $5) ORDER BY created_at, id LIMIT $6"
);

async fn load(cluster: &Cluster, users: usize, per_user: usize, results: &Results) -> Result<f64> {
    let su = cluster.su().await?;
    su.batch_execute("SET session_replication_role = replica")
        .await?;
    let started = Instant::now();
    let chunk = (per_user / 20).max(1);
    let mut i0 = 0usize;
    while i0 < per_user {
        let i1 = (i0 + chunk).min(per_user) - 1;
        // Rows interleaved over users (i-major): each user's rows are spread over the heap.
        let sql = format!(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, created_at, schema_version) \
             SELECT 'todo', CASE WHEN i % 4 = 3 THEN 'lists' ELSE 'tasks' END, 'rec-' || i, 'puser-' || u, 'insert', \
             jsonb_build_object('title', 'Task number ' || i, 'done', i % 2 = 0, 'priority', i % 5, \
               'notes', 'Pick up the parcel at the post office before six', 'updatedAt', '2026-11-21T10:05:00.000Z'), \
             '{{}}'::jsonb, 'loader', timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second' + u * interval '1 microsecond', 1 \
             FROM generate_series({i0}, {i1}) i, generate_series(0, {}) u",
            users - 1
        );
        su.batch_execute(&sql).await?;
        i0 = i1 + 1;
        let done = i0 * users;
        eprintln!(
            "  loaded {done} rows in {:.1} s ({:.0} rows/s)",
            started.elapsed().as_secs_f64(),
            done as f64 / started.elapsed().as_secs_f64()
        );
    }
    su.batch_execute(
        "INSERT INTO sync_user_clock (user_id, last_at, folded_at) \
         SELECT user_id, max(created_at), max(created_at) FROM sync_changes WHERE user_id LIKE 'puser-%' GROUP BY user_id \
         ON CONFLICT (user_id) DO UPDATE SET last_at = excluded.last_at, folded_at = excluded.folded_at",
    )
    .await?;
    let load_secs = started.elapsed().as_secs_f64();
    let t = Instant::now();
    su.batch_execute("VACUUM ANALYZE sync_changes").await?;
    let vacuum = t.elapsed().as_secs_f64();
    let size: i64 = su
        .query_one("SELECT pg_total_relation_size('sync_changes')", &[])
        .await?
        .get(0);
    eprintln!(
        "  load: {} rows in {load_secs:.1} s, VACUUM ANALYZE {vacuum:.1} s, table+indexes {}",
        users * per_user,
        fmt_bytes(size as f64)
    );
    results.write(
        "pull",
        "load",
        json!({"rows": users * per_user, "users": users, "load_secs": load_secs,
        "vacuum_analyze_secs": vacuum, "relation_bytes": size}),
    );
    Ok(load_secs)
}

pub async fn run(args: Args, results: &mut Results) -> Result<()> {
    let cluster = Cluster::start(false).await?;
    let outcome = run_inner(&args, &cluster, results).await;
    cluster.stop().await;
    outcome
}

async fn run_inner(args: &Args, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let keys = Keys::create()?;
    let server = InProcess::start(cluster, &keys).await?;
    let users = (args.rows / args.rows_per_user).max(1);
    let per_user = args.rows_per_user;
    if per_user < 1500 {
        return Err(err(
            "--rows-per-user must be at least 1500 (a full page after every cursor)",
        ));
    }
    println!(
        "pull: {} rows over {users} users ({per_user} each, rows interleaved in time), cluster non-durable; server in-process on {}",
        users * per_user, server.addr
    );
    load(cluster, users, per_user, results).await?;
    let tokens: Vec<String> = (0..users)
        .map(|u| format!("Bearer {}", keys.token(&format!("puser-{u}"))))
        .collect();

    let mut conn = HttpConn::connect(server.addr, None).await?;
    let mut sql = cluster.app_role().await?;
    let lock = sql.prepare(&lock_shared()).await?;
    let page = sql.prepare(PULL_PAGE).await?;
    let mut rng = Rng::new(0);
    let mut pick = move || {
        let u = rng.index(users);
        let k = rng.index(per_user - 1400);
        (u, k)
    };

    let mut srv_runs: Vec<Histogram> = Vec::new();
    let mut tx_runs: Vec<Histogram> = Vec::new();
    let mut q_runs: Vec<Histogram> = Vec::new();
    for run in 0..args.runs {
        let mut srv = Histogram::new();
        let mut tx_h = Histogram::new();
        let mut q_h = Histogram::new();
        // Alternate which goes first, so neither always gets the warmer cache.
        for phase in 0..2 {
            let server_phase = (phase + run) % 2 == 0;
            for n in 0..(args.warm_requests + args.requests) {
                let (u, k) = pick();
                let measured = n >= args.warm_requests;
                if server_phase {
                    let path = format!(
                        "/sync/todo/pull?collection=tasks&since={}&limit=1000",
                        percent_encode(&cursor_2025(k as i64, 0))
                    );
                    let t = Instant::now();
                    let r = conn
                        .send(
                            "GET",
                            &path,
                            &[
                                ("authorization", &tokens[u]),
                                ("x-client-id", "bench-puller"),
                            ],
                            bytes::Bytes::new(),
                        )
                        .await;
                    let took = t.elapsed();
                    match r {
                        Ok((200, body)) => {
                            let v: Value = serde_json::from_slice(&body)?;
                            let count = v["serverChanges"].as_array().map(|a| a.len()).unwrap_or(0);
                            if count != 1000 || v["hasMore"] != json!(true) {
                                results.error(format!(
                                    "pull of puser-{u} since {k}s: {count} changes, hasMore {}",
                                    v["hasMore"]
                                ));
                            }
                            if measured {
                                srv.record_duration(took);
                            }
                        }
                        Ok((status, body)) => results.error(format!(
                            "pull answered {status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        )),
                        Err(e) => {
                            results.error(format!("pull failed: {e}"));
                            conn = HttpConn::connect(server.addr, None).await?;
                        }
                    }
                } else {
                    let user = format!("puser-{u}");
                    let since = UNIX_EPOCH + Duration::from_secs(BASE_UNIX + k as u64);
                    let since: SystemTime = since;
                    let t = Instant::now();
                    let tx = sql.transaction().await?;
                    tx.execute(&lock, &[&user]).await?;
                    let tq = Instant::now();
                    let rows = tx
                        .query(
                            &page,
                            &[&user, &"todo", &"tasks", &since, &"bench-puller", &1001i64],
                        )
                        .await?;
                    let q_took = tq.elapsed();
                    tx.commit().await?;
                    let took = t.elapsed();
                    if rows.len() != 1001 {
                        results.error(format!("direct SQL page of {user}: {} rows", rows.len()));
                    }
                    if measured {
                        tx_h.record_duration(took);
                        q_h.record_duration(q_took);
                    }
                }
            }
        }
        eprintln!(
            "  run {run}: server p50 {:.2} p99 {:.2} ms | SQL transaction p50 {:.2} p99 {:.2} ms | page query alone p50 {:.2} p99 {:.2} ms",
            ms(srv.quantile(0.5)), ms(srv.quantile(0.99)), ms(tx_h.quantile(0.5)), ms(tx_h.quantile(0.99)),
            ms(q_h.quantile(0.5)), ms(q_h.quantile(0.99))
        );
        results.write("pull", "run", json!({"run": run, "rows": users * per_user, "users": users,
            "server": srv.summary_ms(), "sql_transaction": tx_h.summary_ms(), "sql_page_query": q_h.summary_ms()}));
        srv_runs.push(srv);
        tx_runs.push(tx_h);
        q_runs.push(q_h);
    }
    let med = |hs: &[Histogram], q: f64| {
        median(&hs.iter().map(|h| ms(h.quantile(q))).collect::<Vec<_>>())
    };
    println!();
    println!("pull: {} rows, {users} users, 1,000-row pages, {} requests per run after {} warm-up; medians of {} runs",
        users * per_user, args.requests, args.warm_requests, args.runs);
    println!("| what | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, hs) in [
        ("GET /sync/todo/pull (server, HTTP, JSON)", &srv_runs),
        (
            "same SQL directly: BEGIN + lock + page query + COMMIT",
            &tx_runs,
        ),
        ("same SQL directly: page query alone", &q_runs),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            med(hs, 0.5),
            med(hs, 0.99),
            med(hs, 1.0)
        );
    }
    let ratio_p50 = med(&srv_runs, 0.5) / med(&tx_runs, 0.5);
    let ratio_p99 = med(&srv_runs, 0.99) / med(&tx_runs, 0.99);
    println!("server / direct SQL transaction: p50 {ratio_p50:.2}x, p99 {ratio_p99:.2}x");
    results.write("pull", "summary", json!({"rows": users * per_user, "users": users, "runs": args.runs,
        "server_p50_ms": med(&srv_runs, 0.5), "server_p99_ms": med(&srv_runs, 0.99), "server_max_ms": med(&srv_runs, 1.0),
        "sql_tx_p50_ms": med(&tx_runs, 0.5), "sql_tx_p99_ms": med(&tx_runs, 0.99),
        "sql_query_p50_ms": med(&q_runs, 0.5), "sql_query_p99_ms": med(&q_runs, 0.99),
        "ratio_p50": ratio_p50, "ratio_p99": ratio_p99}));
    drop(sql);
    server.stop().await;
    Ok(())
}
