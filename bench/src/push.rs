//! Scenario `push`: changes/s through `POST /sync/{app}` against two baselines measured in the same run on
//! the same cluster: raw ingest (the same rows into a trigger-less, RLS-less copy of the table with one
//! multi-row `INSERT … SELECT FROM unnest` per batch, one connection) and today's server's pattern (one
//! transaction per change: `set_config` + a single-row INSERT into sync_changes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

use crate::common::*;
use crate::cpu::{micros_per, CpuMeter, CpuSample};
use crate::hist::{ms, Histogram};

pub struct Args {
    pub runs: usize,
    pub warm: Duration,
    pub dur: Duration,
    pub batches: Vec<usize>,
    pub devices: Vec<usize>,
    pub one_user_devices: Vec<usize>,
    pub durable: bool,
}

pub const APP: &str = "todo";
const NOTES: &str = "Pick up the parcel at the post office before six";

pub fn record(dev: &str, n: u64) -> Value {
    json!({
        "title": format!("Task {n} of {dev}"),
        "done": n.is_multiple_of(2),
        "priority": n % 5,
        "notes": NOTES,
        "updatedAt": "2026-11-21T10:05:00.000Z",
    })
}

/// A push of `batch` inserts of new records `r-{dev}-{seq}` (seq counting on from `seq`).
pub fn body(dev: &str, since: &str, seq: &mut u64, batch: usize) -> Bytes {
    let mut changes = Vec::with_capacity(batch);
    for _ in 0..batch {
        *seq += 1;
        changes.push(json!({
            "table": "tasks", "id": format!("r-{dev}-{seq}"), "op": "insert",
            "data": record(dev, *seq),
        }));
    }
    Bytes::from(
        json!({"clientId": dev, "since": since, "schemaVersion": 1, "changes": changes})
            .to_string(),
    )
}

#[derive(Default)]
struct Outcome {
    window_changes: u64,
    ok_pushes: u64,
    errors: Vec<String>,
    hist: Histogram,
    cpu: CpuSample,
}

/// `devices` devices push `batch`-sized batches as fast as they can for warm + dur; returns changes/s
/// over the measured window, push latency, and checks afterwards that every acknowledged change is stored.
#[allow(clippy::too_many_arguments)]
async fn push_cell(
    addr: std::net::SocketAddr,
    cluster: &Cluster,
    keys: &Keys,
    tag: &str,
    batch: usize,
    devices: usize,
    one_user: bool,
    warm: Duration,
    dur: Duration,
) -> Result<(f64, Outcome)> {
    let start = Instant::now() + Duration::from_millis(200);
    let warm_end = start + warm;
    let end = warm_end + dur;
    let cpu = CpuMeter::new(cluster.pg.pgdata_dir()).over(warm_end, end);
    let mut users = Vec::new();
    let mut tasks = Vec::new();
    for d in 0..devices {
        let user = if one_user {
            format!("{tag}-u")
        } else {
            format!("{tag}-u{d}")
        };
        if !users.contains(&user) {
            users.push(user.clone());
        }
        let token = format!("Bearer {}", keys.token(&user));
        let dev = format!("{tag}-d{d}");
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut conn = match HttpConn::connect(addr, None).await {
                Ok(c) => c,
                Err(e) => {
                    out.errors.push(format!("connect: {e}"));
                    return out;
                }
            };
            tokio::time::sleep_until(start.into()).await;
            let mut since = LOG_START.to_string();
            let mut seq = 0u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let b = body(&dev, &since, &mut seq, batch);
                let sent = Instant::now();
                let r = conn
                    .send(
                        "POST",
                        &format!("/sync/{APP}"),
                        &[
                            ("authorization", &token),
                            ("content-type", "application/json"),
                            ("x-client-id", &dev),
                        ],
                        b,
                    )
                    .await;
                let done = Instant::now();
                match r {
                    Ok((200, resp)) => {
                        out.ok_pushes += 1;
                        if done >= warm_end && done <= end {
                            out.window_changes += batch as u64;
                            out.hist.record_duration(done - sent);
                        }
                        match synced_until(&resp) {
                            Some(s) => since = s,
                            None => out.errors.push("response without syncedUntil".into()),
                        }
                    }
                    Ok((status, resp)) => {
                        out.errors.push(format!(
                            "push answered {status}: {}",
                            String::from_utf8_lossy(&resp[..resp.len().min(300)])
                        ));
                        if out.errors.len() > 20 {
                            break;
                        }
                    }
                    Err(e) => {
                        out.errors.push(format!("push failed: {e}"));
                        break;
                    }
                }
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await?;
        total.window_changes += o.window_changes;
        total.ok_pushes += o.ok_pushes;
        total.errors.extend(o.errors);
        total.hist.merge(&o.hist);
    }
    total.cpu = cpu.await?;
    // No lost change: every acknowledged change is a row.
    let su = cluster.su().await?;
    let stored: i64 = su
        .query_one(
            "SELECT count(*) FROM sync_changes WHERE user_id = ANY($1)",
            &[&users],
        )
        .await?
        .get(0);
    let expected = total.ok_pushes * batch as u64;
    if stored as u64 != expected {
        total.errors.push(format!(
            "LOST OR EXTRA CHANGES: {tag}: {expected} changes acknowledged, {stored} rows stored"
        ));
    }
    Ok((total.window_changes as f64 / dur.as_secs_f64(), total))
}

const RAW_TABLE: &str = concat!(
    "CREATE TABLE IF NOT EXISTS bench_raw_ingest ",
    "(LIKE sync_changes INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
);
const RAW_INSERT: &str = concat!(
    "INSERT INTO bench_raw_ingest (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, ",
    "schema_version, actor, origin, space_id) ",
    "SELECT $1, t, r, $2, o, d, f, $3, v, a, g, s FROM unnest($4::text[], $5::text[], $6::text[], $7::jsonb[], ",
    "$8::jsonb[], $9::int4[], $10::jsonb[], $11::text[], $12::text[]) AS u(t, r, o, d, f, v, a, g, s)"
);

/// Raw ingest: the same rows, one multi-row insert per batch (its own transaction), one connection.
async fn raw_cell(
    cluster: &Cluster,
    tag: &str,
    batch: usize,
    warm: Duration,
    dur: Duration,
) -> Result<f64> {
    let client = cluster.su().await?;
    client.batch_execute(RAW_TABLE).await?;
    let stmt = client.prepare(RAW_INSERT).await?;
    let user = format!("{tag}-u");
    let dev = format!("{tag}-d");
    let start = Instant::now();
    let warm_end = start + warm;
    let end = warm_end + dur;
    let mut seq = 0u64;
    let mut window = 0u64;
    while Instant::now() < end {
        let mut tables = Vec::with_capacity(batch);
        let mut ids = Vec::with_capacity(batch);
        let mut ops = Vec::with_capacity(batch);
        let mut data = Vec::with_capacity(batch);
        let mut meta = Vec::with_capacity(batch);
        let mut versions = Vec::with_capacity(batch);
        let mut actors: Vec<Option<Value>> = Vec::with_capacity(batch);
        let mut origins: Vec<Option<String>> = Vec::with_capacity(batch);
        let mut spaces: Vec<Option<String>> = Vec::with_capacity(batch);
        for _ in 0..batch {
            seq += 1;
            tables.push("tasks".to_string());
            ids.push(format!("r-{dev}-{seq}"));
            ops.push("insert".to_string());
            data.push(record(&dev, seq));
            meta.push(json!({}));
            versions.push(1i32);
            actors.push(None);
            origins.push(None);
            spaces.push(None);
        }
        let params: [&(dyn ToSql + Sync); 12] = [
            &APP, &user, &dev, &tables, &ids, &ops, &data, &meta, &versions, &actors, &origins,
            &spaces,
        ];
        client.execute(&stmt, &params).await?;
        let done = Instant::now();
        if done >= warm_end && done <= end {
            window += batch as u64;
        }
    }
    Ok(window as f64 / dur.as_secs_f64())
}

/// Today's server's way of storing a change: a transaction of its own (`set_config` + a single-row INSERT
/// into sync_changes, so the stamp/clock/notify triggers and row-level security apply), as the ordinary role.
pub struct OneTx {
    set: tokio_postgres::Statement,
    insert: tokio_postgres::Statement,
}

impl OneTx {
    pub async fn prepare(client: &tokio_postgres::Client) -> Result<OneTx> {
        let set = client
            .prepare("SELECT set_config('app.current_user_id', $1, true)")
            .await?;
        let insert = client
            .prepare(concat!(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id) ",
                "VALUES ($1, 'tasks', $2, $3, 'insert', $4, '{}', $5)"
            ))
            .await?;
        Ok(OneTx { set, insert })
    }

    /// Stores one change of `user`'s record `id` (app todo, table tasks) in a transaction of its own.
    pub async fn store(
        &self,
        client: &mut tokio_postgres::Client,
        user: &str,
        id: &str,
        data: &Value,
        device: &str,
    ) -> Result<()> {
        let tx = client.transaction().await?;
        tx.execute(&self.set, &[&user]).await?;
        tx.execute(&self.insert, &[&APP, &id, &user, data, &device])
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Today's server's pattern: one transaction per change (set_config + single-row INSERT), `conns`
/// connections as the ordinary role, each its own user.
async fn one_tx_cell(
    cluster: &Cluster,
    tag: &str,
    conns: usize,
    warm: Duration,
    dur: Duration,
) -> Result<(f64, CpuSample)> {
    let start = Instant::now() + Duration::from_millis(200);
    let warm_end = start + warm;
    let end = warm_end + dur;
    let cpu = CpuMeter::new(cluster.pg.pgdata_dir()).over(warm_end, end);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let conn_str = cluster.app_conn.clone();
        let user = format!("{tag}-u{c}");
        let dev = format!("{tag}-d{c}");
        tasks.push(tokio::spawn(async move {
            let mut client = connect_pg(&conn_str).await?;
            let one_tx = OneTx::prepare(&client).await?;
            tokio::time::sleep_until(start.into()).await;
            let mut seq = 0u64;
            let mut window = 0u64;
            while Instant::now() < end {
                seq += 1;
                let id = format!("r-{dev}-{seq}");
                let data = record(&dev, seq);
                one_tx.store(&mut client, &user, &id, &data, &dev).await?;
                let done = Instant::now();
                if done >= warm_end && done <= end {
                    window += 1;
                }
            }
            Ok::<u64, BoxError>(window)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total as f64 / dur.as_secs_f64(), cpu.await?))
}

pub async fn run(args: Args, results: &mut Results) -> Result<()> {
    let cluster = Cluster::start(args.durable).await?;
    let outcome = run_inner(&args, &cluster, results).await;
    cluster.stop().await;
    outcome
}

async fn run_inner(args: &Args, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let keys = Keys::create()?;
    let server = InProcess::start(cluster, &keys).await?;
    cluster.seed_others(1_000, 100_000).await?;
    let addr = server.addr;
    let durability = if args.durable {
        "durable"
    } else {
        "non-durable (fsync/synchronous_commit/full_page_writes off)"
    };
    println!("push: 100,000 records of 1,000 other users, then VACUUM ANALYZE");
    println!("push: cluster {durability}; server in-process on {addr}; {} cores; runs {}, warm-up {:?}, measured {:?} per cell",
        num_cpus(), args.runs, args.warm, args.dur);

    // cell key -> per-run values
    let mut push: BTreeMap<(usize, usize, bool), Vec<(f64, Histogram)>> = BTreeMap::new();
    let mut raw: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut one_tx: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut ratios_raw: BTreeMap<(usize, usize, bool), Vec<f64>> = BTreeMap::new();
    let mut ratios_tx: BTreeMap<(usize, usize, bool), Vec<f64>> = BTreeMap::new();
    // CPU µs per change (own process, postgres): the one-tx baseline by connections, push by cell.
    let mut one_tx_cpu: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    let mut push_cpu: BTreeMap<(usize, usize, bool), Vec<(f64, f64)>> = BTreeMap::new();
    let nonce = mana_sync::clock::unix_now();

    for run in 0..args.runs {
        // Baseline b first (it does not depend on the batch size).
        let mut tx_run = BTreeMap::new();
        for &c in &args.devices {
            let tag = format!("otx{nonce}r{run}c{c}");
            let (v, cpu) = one_tx_cell(cluster, &tag, c, args.warm, args.dur).await?;
            let changes = v * args.dur.as_secs_f64();
            let (own, pg) = (
                micros_per(cpu.own, changes),
                micros_per(cpu.postgres, changes),
            );
            eprintln!("  run {run}: one-tx-per-change, {c} connections: {v:.0} changes/s; CPU per change: client {own:.0} µs, postgres {pg:.0} µs");
            results.write(
                "push",
                "run",
                json!({"run": run, "baseline": "one_tx_per_change", "connections": c,
                "changes_per_s": v, "durable": args.durable,
                "cpu_us_per_change": {"client": own, "postgres": pg}}),
            );
            one_tx_cpu.entry(c).or_default().push((own, pg));
            one_tx.entry(c).or_default().push(v);
            tx_run.insert(c, v);
        }
        for &b in &args.batches {
            let tag = format!("raw{nonce}r{run}b{b}");
            let raw_v = raw_cell(cluster, &tag, b, args.warm, args.dur).await?;
            eprintln!("  run {run}: raw ingest, batch {b}: {raw_v:.0} changes/s");
            results.write(
                "push",
                "run",
                json!({"run": run, "baseline": "raw_ingest", "batch": b,
                "changes_per_s": raw_v, "durable": args.durable}),
            );
            raw.entry(b).or_default().push(raw_v);
            let mut cells: Vec<(usize, bool)> = args.devices.iter().map(|&d| (d, false)).collect();
            cells.extend(args.one_user_devices.iter().map(|&d| (d, true)));
            for (d, one_user) in cells {
                let tag = format!(
                    "p{nonce}r{run}b{b}d{d}{}",
                    if one_user { "one" } else { "" }
                );
                let (v, out) = push_cell(
                    addr, cluster, &keys, &tag, b, d, one_user, args.warm, args.dur,
                )
                .await?;
                for e in out.errors.iter().take(5) {
                    results.error(format!(
                        "push batch {b} devices {d} one_user {one_user}: {e}"
                    ));
                }
                if out.errors.len() > 5 {
                    results.errors += (out.errors.len() - 5) as u64;
                    eprintln!("  ... {} more errors", out.errors.len() - 5);
                }
                let tx_base = tx_run
                    .get(&d)
                    .copied()
                    .or_else(|| tx_run.values().copied().last())
                    .unwrap_or(f64::NAN);
                let changes = v * args.dur.as_secs_f64();
                let (own, pg) = (
                    micros_per(out.cpu.own, changes),
                    micros_per(out.cpu.postgres, changes),
                );
                eprintln!(
                    "  run {run}: push batch {b}, {d} devices ({}): {v:.0} changes/s, p50 {:.2} ms, p99 {:.2} ms; /raw {:.2}, /1tx {:.1}; CPU per change: server+client {own:.0} µs, postgres {pg:.0} µs",
                    if one_user { "one user" } else { "distinct users" },
                    ms(out.hist.quantile(0.5)), ms(out.hist.quantile(0.99)), v / raw_v, v / tx_base
                );
                push_cpu
                    .entry((b, d, one_user))
                    .or_default()
                    .push((own, pg));
                results.write("push", "run", json!({"run": run, "batch": b, "devices": d,
                    "users": if one_user { "one" } else { "distinct" }, "changes_per_s": v,
                    "latency": out.hist.summary_ms(), "raw_ingest_changes_per_s": raw_v,
                    "one_tx_changes_per_s": tx_base, "ratio_raw": v / raw_v, "ratio_one_tx": v / tx_base,
                    "errors": out.errors.len(), "durable": args.durable,
                    "cpu_us_per_change": {"server_and_client": own, "postgres": pg}}));
                push.entry((b, d, one_user))
                    .or_default()
                    .push((v, out.hist));
                ratios_raw
                    .entry((b, d, one_user))
                    .or_default()
                    .push(v / raw_v);
                ratios_tx
                    .entry((b, d, one_user))
                    .or_default()
                    .push(v / tx_base);
            }
        }
    }

    println!();
    println!(
        "push ({}; medians of {} runs; ratios are medians of per-run ratios)",
        if args.durable {
            "durable cluster"
        } else {
            "non-durable cluster"
        },
        args.runs
    );
    println!("| batch | devices | users | push changes/s | push p50 ms | push p99 ms | raw ingest changes/s | push/raw | one-tx-per-change changes/s (same conns) | push/one-tx |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for ((b, d, one_user), runs) in &push {
        let v = median(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
        let p50 = median(
            &runs
                .iter()
                .map(|r| ms(r.1.quantile(0.5)))
                .collect::<Vec<_>>(),
        );
        let p99 = median(
            &runs
                .iter()
                .map(|r| ms(r.1.quantile(0.99)))
                .collect::<Vec<_>>(),
        );
        let raw_v = median(&raw[b]);
        let tx_v = one_tx.get(d).map(|v| median(v)).unwrap_or(f64::NAN);
        let rr = median(&ratios_raw[&(*b, *d, *one_user)]);
        let rt = median(&ratios_tx[&(*b, *d, *one_user)]);
        let users = if *one_user { "one" } else { "distinct" };
        println!("| {b} | {d} | {users} | {v:.0} | {p50:.2} | {p99:.2} | {raw_v:.0} | {rr:.2} | {tx_v:.0} | {rt:.1} |");
        results.write(
            "push",
            "summary",
            json!({"batch": b, "devices": d, "users": users, "runs": args.runs,
            "changes_per_s_median": v, "p50_ms_median": p50, "p99_ms_median": p99,
            "raw_ingest_changes_per_s_median": raw_v, "one_tx_changes_per_s_median": tx_v,
            "ratio_raw_median": rr, "ratio_one_tx_median": rt, "durable": args.durable}),
        );
    }
    println!();
    println!("CPU per change (µs, medians): this process (server + load generator; the baseline's client alone) and PostgreSQL");
    println!("| batch | devices | users | push: server+client | push: postgres | one-tx: client | one-tx: postgres |");
    println!("|---:|---:|---|---:|---:|---:|---:|");
    let medians = |values: &[(f64, f64)]| {
        let own: Vec<f64> = values.iter().map(|v| v.0).collect();
        let pg: Vec<f64> = values.iter().map(|v| v.1).collect();
        (median(&own), median(&pg))
    };
    for ((b, d, one_user), values) in &push_cpu {
        let (own, pg) = medians(values);
        let (tx_own, tx_pg) = one_tx_cpu
            .get(d)
            .map(|v| medians(v))
            .unwrap_or((f64::NAN, f64::NAN));
        let users = if *one_user { "one" } else { "distinct" };
        println!("| {b} | {d} | {users} | {own:.0} | {pg:.0} | {tx_own:.0} | {tx_pg:.0} |");
    }
    server.stop().await;
    Ok(())
}
