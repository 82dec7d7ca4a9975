//! Scenarios `empty-pull` and `mix` (issue 10, the hot path): closed-loop request rates over C keep-alive
//! connections against the same work done as bare SQL the way today's Go server does it, in the same run.
//!
//! * `empty-pull`: every request is `GET /sync/todo/pull?collection=tasks&since=<the user's newest
//!   syncedUntil>`, the web client's poll when nothing is new; every answer must hold `serverChanges: []`.
//! * `mix`: per request, drawn at random: 90 % such pulls, 9 % pushes of 1 change, 1 % pushes of 20 changes
//!   (updates of the user's own records, `since` = the newest syncedUntil the tool holds for that user).
//!
//! Every user has one client id (its web client pushes and polls), so a pull never returns the user's own
//! pushes, even those another connection made a moment ago: pulls must be empty in both scenarios.
//!
//! Baseline: the Go server's statements over as many connections as the ordinary role, over the same Unix
//! socket: a pull is `BEGIN`, `set_config('app.current_user_id', …)`, the page query (`LIMIT 1001`),
//! `COMMIT`; a push of n changes is n transactions of `set_config` + a single-row INSERT (the push scenario's
//! one-transaction-per-change code). Which side goes first alternates per run.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use mana_sync::clock::now_micros;
use mana_sync::protocol::time::{format_cursor, parse_rfc3339, Micros};
use serde_json::{json, Map, Value};

use crate::common::*;
use crate::cpu::{micros_per, CpuMeter};
use crate::hist::{ms, Histogram};
use crate::push::{self, OneTx, APP};

pub struct Args {
    pub runs: usize,
    pub users: usize,
    pub connections: usize,
    pub warm: Duration,
    pub dur: Duration,
    pub durable: bool,
}

/// What one request does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pull,
    Push(usize),
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Pull => "pull".into(),
            Kind::Push(n) => format!("push {n}"),
        }
    }
}

/// Kinds of request with their weights in percent.
type Mix = &'static [(Kind, usize)];

const EMPTY_PULL: Mix = &[(Kind::Pull, 100)];
const MIX: Mix = &[(Kind::Pull, 90), (Kind::Push(1), 9), (Kind::Push(20), 1)];

fn pick(mix: Mix, rng: &mut Rng) -> usize {
    let mut r = rng.index(100);
    for (i, (_, weight)) in mix.iter().enumerate() {
        if r < *weight {
            return i;
        }
        r -= weight;
    }
    mix.len() - 1
}

fn has_pushes(mix: Mix) -> bool {
    mix.iter().any(|(kind, _)| *kind != Kind::Pull)
}

/// The Go server's pull: the columns of src/store/mod.rs PULL_PAGE, without the device filter and the id
/// tie-breaker, `LIMIT 1001`.
const GO_PULL_PAGE: &str = concat!(
    "SELECT id::text, table_name, record_id, op, data, field_meta, created_at, schema_version, actor, origin, space_id ",
    "FROM sync_changes WHERE user_id = $1 AND app_id = $2 AND table_name = $3 AND created_at > $4 ",
    "ORDER BY created_at LIMIT 1001"
);
const SET_USER: &str = "SELECT set_config('app.current_user_id', $1, true)";

/// The simulated users: each with a token, one client id (its web client), `records` records
/// `r-{device}-1…`, and the newest cursor the tool has seen for it (from any connection).
struct Users {
    names: Vec<String>,
    auth: Vec<String>,
    devices: Vec<String>,
    cursors: Vec<AtomicI64>,
    records: usize,
}

impl Users {
    fn new(prefix: &str, count: usize, records: usize, keys: &Keys) -> Users {
        let names: Vec<String> = (0..count).map(|u| format!("{prefix}-u{u}")).collect();
        Users {
            auth: names
                .iter()
                .map(|n| format!("Bearer {}", keys.token(n)))
                .collect(),
            devices: names.iter().map(|n| format!("{n}-web")).collect(),
            cursors: (0..count).map(|_| AtomicI64::new(0)).collect(),
            names,
            records,
        }
    }

    fn len(&self) -> usize {
        self.names.len()
    }

    fn cursor(&self, u: usize) -> Micros {
        self.cursors[u].load(Ordering::Relaxed)
    }

    /// Cursors only move forward: answers of concurrent requests of one user may arrive out of order.
    fn advance(&self, u: usize, to: Micros) {
        self.cursors[u].fetch_max(to, Ordering::Relaxed);
    }

    fn advance_from(&self, u: usize, body: &[u8]) -> std::result::Result<(), String> {
        let cursor = synced_until(body).ok_or("answer without syncedUntil")?;
        let micros = parse_rfc3339(&cursor).map_err(|e| format!("syncedUntil {cursor}: {e}"))?;
        self.advance(u, micros);
        Ok(())
    }

    /// One edit of a random record of user `u`: its id and the new value of its title.
    fn edit(&self, u: usize, rng: &mut Rng) -> (String, Value) {
        let k = rng.index(self.records) + 1; // push::body numbers records from 1
        let id = format!("r-{}-{k}", self.devices[u]);
        (
            id,
            json!({"title": format!("Task {k}, edit {}", rng.next() % 1000)}),
        )
    }
}

/// Field timestamps of edits: now, in microseconds, strictly increasing over the whole tool, so that an
/// edit loses the merge only if an edit of the same record with a later timestamp, pushed concurrently
/// through another connection, was stored first. The server logs only edits that win (a lost one is
/// answered as a conflict), which the row count check takes into account.
fn edit_at() -> String {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_micros();
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap();
    format_cursor(now.max(previous + 1))
}

/// Each user pushes its `records` new records once (over `conns` connections), which gives it rows, a
/// clock and its first cursor.
async fn setup(addr: std::net::SocketAddr, users: &Arc<Users>, conns: usize) -> Result<()> {
    let mut tasks = Vec::new();
    for c in 0..conns.min(users.len()) {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::connect(addr, None).await?;
            for u in (c..users.len()).step_by(conns) {
                let mut seq = 0;
                let body = push::body(&users.devices[u], LOG_START, &mut seq, users.records);
                let (status, resp) = conn
                    .send("POST", &format!("/sync/{APP}"), &headers(&users, u), body)
                    .await?;
                if status != 200 {
                    return Err(err(format!(
                        "setup push of {} answered {status}",
                        users.names[u]
                    )));
                }
                users.advance_from(u, &resp).map_err(err)?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Authorization and client id of user `u`, then the content type of a push.
fn headers(users: &Users, u: usize) -> [(&'static str, &str); 3] {
    [
        ("authorization", &users.auth[u]),
        ("x-client-id", &users.devices[u]),
        ("content-type", "application/json"),
    ]
}

/// A push of `changes` edits of user `u`'s records, `since` its newest cursor.
fn push_body(users: &Users, u: usize, changes: usize, rng: &mut Rng) -> Bytes {
    let changes: Vec<Value> = (0..changes)
        .map(|_| {
            let (id, values) = users.edit(u, rng);
            let fields: Map<String, Value> = values
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, value)| (name.clone(), json!({"value": value, "at": edit_at()})))
                .collect();
            json!({"table": "tasks", "id": id, "op": "update", "fields": fields})
        })
        .collect();
    let since = format_cursor(users.cursor(u));
    Bytes::from(
        json!({"clientId": users.devices[u], "since": since, "schemaVersion": 1, "changes": changes}).to_string(),
    )
}

/// What the connections of one side measured in one run.
struct Tally {
    /// Latency per kind of the mix (same order), requests completed in the measured window.
    hists: Vec<Histogram>,
    /// Length of the measured window.
    secs: f64,
    /// Changes pushed and acknowledged over the whole phase (warm-up included).
    acked_changes: u64,
    /// Edits the server answered as conflicts (they lost the merge and are not logged).
    conflicts: u64,
    /// Pulls that returned changes.
    nonempty_pulls: u64,
    errors: Vec<String>,
}

impl Tally {
    fn new(mix: Mix, window: &Window) -> Tally {
        Tally {
            hists: mix.iter().map(|_| Histogram::new()).collect(),
            secs: window.measured().as_secs_f64(),
            acked_changes: 0,
            conflicts: 0,
            nonempty_pulls: 0,
            errors: Vec::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        for (a, b) in self.hists.iter_mut().zip(&other.hists) {
            a.merge(b);
        }
        self.acked_changes += other.acked_changes;
        self.conflicts += other.conflicts;
        self.nonempty_pulls += other.nonempty_pulls;
        self.errors.extend(other.errors);
    }

    fn req_per_s(&self) -> f64 {
        self.hists.iter().map(Histogram::count).sum::<u64>() as f64 / self.secs
    }

    fn json(&self, mix: Mix) -> Value {
        let kinds: Map<String, Value> = mix
            .iter()
            .zip(&self.hists)
            .map(|((kind, _), h)| (kind.label(), h.summary_ms()))
            .collect();
        json!({"req_per_s": self.req_per_s(), "kinds": kinds,
            "acked_changes": self.acked_changes, "conflicts": self.conflicts, "nonempty_pulls": self.nonempty_pulls, "errors": self.errors.len()})
    }
}

/// The server side: one keep-alive HTTP/1.1 connection per task, random users and kinds.
async fn server_side(
    addr: std::net::SocketAddr,
    users: &Arc<Users>,
    mix: Mix,
    conns: usize,
    window: Window,
    seed: u64,
) -> Result<Tally> {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new(mix, &window);
            let mut conn = match HttpConn::connect(addr, None).await {
                Ok(conn) => conn,
                Err(e) => {
                    tally.errors.push(format!("connect: {e}"));
                    return tally;
                }
            };
            let mut rng = Rng::new(seed + c as u64);
            tokio::time::sleep_until(window.start.into()).await;
            while Instant::now() < window.end {
                let u = rng.index(users.len());
                let k = pick(mix, &mut rng);
                let kind = mix[k].0;
                let headers = headers(&users, u);
                let (method, path, headers, body) = match kind {
                    Kind::Pull => {
                        let since = percent_encode(&format_cursor(users.cursor(u)));
                        let path = format!("/sync/{APP}/pull?collection=tasks&since={since}");
                        ("GET", path, &headers[..2], Bytes::new())
                    }
                    Kind::Push(n) => (
                        "POST",
                        format!("/sync/{APP}"),
                        &headers[..],
                        push_body(&users, u, n, &mut rng),
                    ),
                };
                let sent = Instant::now();
                let answer = conn.send(method, &path, headers, body).await;
                let done = Instant::now();
                match answer {
                    Ok((200, resp)) => {
                        if let Err(e) = users.advance_from(u, &resp) {
                            tally.errors.push(e);
                        }
                        match kind {
                            Kind::Pull if !contains(&resp, b"\"serverChanges\":[]") => {
                                tally.nonempty_pulls += 1;
                                tally.errors.push(format!(
                                    "pull of {} is not empty: {}",
                                    users.names[u],
                                    String::from_utf8_lossy(&resp[..resp.len().min(300)])
                                ));
                            }
                            Kind::Pull => {}
                            Kind::Push(n) => {
                                tally.acked_changes += n as u64;
                                tally.conflicts += conflicts(&resp);
                            }
                        }
                        if window.counts(done) {
                            tally.hists[k].record_duration(done - sent);
                        }
                    }
                    Ok((status, resp)) => tally.errors.push(format!(
                        "{} answered {status}: {}",
                        kind.label(),
                        String::from_utf8_lossy(&resp[..resp.len().min(300)])
                    )),
                    Err(e) => {
                        tally.errors.push(format!("{} failed: {e}", kind.label()));
                        break;
                    }
                }
                if tally.errors.len() > 20 {
                    break;
                }
            }
            tally
        }));
    }
    let mut total = Tally::new(mix, &window);
    for t in tasks {
        total.merge(t.await?);
    }
    Ok(total)
}

/// The baseline: the Go server's statements for the same kinds of request, one PostgreSQL connection per
/// task as the ordinary role.
async fn sql_side(
    cluster: &Cluster,
    users: &Arc<Users>,
    mix: Mix,
    conns: usize,
    window: Window,
    seed: u64,
) -> Result<Tally> {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let users = users.clone();
        let conn_str = cluster.app_conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect_pg(&conn_str).await?;
            let set = client.prepare(SET_USER).await?;
            let page = client.prepare(GO_PULL_PAGE).await?;
            let one_tx = OneTx::prepare(&client).await?;
            let mut tally = Tally::new(mix, &window);
            let mut rng = Rng::new(seed + c as u64);
            tokio::time::sleep_until(window.start.into()).await;
            while Instant::now() < window.end {
                let u = rng.index(users.len());
                let k = pick(mix, &mut rng);
                let user = &users.names[u];
                let sent = Instant::now();
                match mix[k].0 {
                    Kind::Pull => {
                        let since = UNIX_EPOCH + Duration::from_micros(users.cursor(u) as u64);
                        let tx = client.transaction().await?;
                        tx.execute(&set, &[user]).await?;
                        let rows = tx.query(&page, &[user, &APP, &"tasks", &since]).await?;
                        tx.commit().await?;
                        if !rows.is_empty() {
                            tally.nonempty_pulls += 1;
                        }
                    }
                    Kind::Push(n) => {
                        for _ in 0..n {
                            let (id, values) = users.edit(u, &mut rng);
                            one_tx
                                .store(&mut client, user, &id, &values, &users.devices[u])
                                .await?;
                        }
                        // The user's next cursor: the time after the commits (the tool and PostgreSQL
                        // share the clock).
                        users.advance(u, now_micros());
                        tally.acked_changes += n as u64;
                    }
                }
                let done = Instant::now();
                if window.counts(done) {
                    tally.hists[k].record_duration(done - sent);
                }
            }
            Ok::<Tally, BoxError>(tally)
        }));
    }
    let mut total = Tally::new(mix, &window);
    for t in tasks {
        total.merge(t.await??);
    }
    Ok(total)
}

/// The number of conflicts in a push answer (each one a field of an edit that lost; edits here change
/// one field, so each one is an edit that was not logged).
fn conflicts(body: &[u8]) -> u64 {
    if contains(body, b"\"conflicts\":[]") {
        return 0;
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["conflicts"].as_array().map(|a| a.len() as u64))
        .unwrap_or(0)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub async fn run_empty_pull(args: Args, results: &mut Results) -> Result<()> {
    run("empty-pull", EMPTY_PULL, 5, args, results).await
}

pub async fn run_mix(args: Args, results: &mut Results) -> Result<()> {
    run("mix", MIX, 20, args, results).await
}

async fn run(
    scenario: &'static str,
    mix: Mix,
    records: usize,
    args: Args,
    results: &mut Results,
) -> Result<()> {
    let cluster = Cluster::start(args.durable).await?;
    let outcome = run_inner(scenario, mix, records, &args, &cluster, results).await;
    cluster.stop().await;
    outcome
}

async fn run_inner(
    scenario: &'static str,
    mix: Mix,
    records: usize,
    args: &Args,
    cluster: &Cluster,
    results: &mut Results,
) -> Result<()> {
    if args.users == 0 || args.connections == 0 {
        return Err(err("--users and --connections must be at least 1"));
    }
    let keys = Keys::create()?;
    let server = InProcess::start(cluster, &keys).await?;
    let addr = server.addr;
    let durability = if cluster.durable {
        "durable"
    } else {
        "non-durable (fsync/synchronous_commit/full_page_writes off)"
    };
    let shares: Vec<String> = mix
        .iter()
        .map(|(kind, w)| format!("{w} % {}", kind.label()))
        .collect();
    println!(
        "{scenario}: {} users x {records} records, {} connections, {}; cluster {durability}; server in-process on {addr}; {} cores; runs {}, warm-up {:?}, measured {:?} per side",
        args.users, args.connections, shares.join(", "), num_cpus(), args.runs, args.warm, args.dur
    );

    // The baseline's pushes would write the server's users' logs behind its back (rows it has not merged):
    // when the mix pushes, the baseline gets users of its own, set up the same way.
    let users = Arc::new(Users::new("hot", args.users, records, &keys));
    let sql_users = if has_pushes(mix) {
        Arc::new(Users::new("hotsql", args.users, records, &keys))
    } else {
        users.clone()
    };
    let t = Instant::now();
    setup(addr, &users, args.connections).await?;
    if !Arc::ptr_eq(&users, &sql_users) {
        setup(addr, &sql_users, args.connections).await?;
    }
    let su = cluster.su().await?;
    su.batch_execute("VACUUM ANALYZE").await?;
    eprintln!("  setup: {:.1} s", t.elapsed().as_secs_f64());

    // Rows the server's users should have: their records, then every acknowledged edit that did not lose.
    let mut expected_rows = (args.users * records) as u64;
    let mut srv_runs: Vec<Tally> = Vec::new();
    let mut sql_runs: Vec<Tally> = Vec::new();
    let mut ratios = Vec::new();
    let mut cpu_runs: Vec<[f64; 4]> = Vec::new();
    for run in 0..args.runs {
        // Alternate which side goes first, so neither always gets the warmer cache or the quieter machine.
        let server_first = run % 2 == 0;
        // Both sides draw the same sequence of users and kinds.
        let seed = 1_000 * run as u64;
        let mut srv = None;
        let mut sql = None;
        for server_turn in [server_first, !server_first] {
            let window = Window::starting_soon(args.warm, args.dur);
            let meter = CpuMeter::new(cluster.pg.pgdata_dir()).over(window.warm_end, window.end);
            if server_turn {
                let tally = server_side(addr, &users, mix, args.connections, window, seed).await?;
                report_errors(results, scenario, &tally.errors);
                // No lost change: every acknowledged edit is a row, unless it was answered as a conflict.
                expected_rows += tally.acked_changes - tally.conflicts;
                let stored: i64 = su
                    .query_one(
                        "SELECT count(*) FROM sync_changes WHERE user_id = ANY($1)",
                        &[&users.names],
                    )
                    .await?
                    .get(0);
                if stored as u64 != expected_rows {
                    results.error(format!(
                        "{scenario}: LOST OR EXTRA CHANGES: {expected_rows} rows expected, {stored} stored"
                    ));
                }
                srv = Some((tally, meter.await?));
            } else {
                let tally =
                    sql_side(cluster, &sql_users, mix, args.connections, window, seed).await?;
                // With pulls only, every cursor is exact: the page query must find nothing.
                if !has_pushes(mix) && tally.nonempty_pulls > 0 {
                    results.error(format!(
                        "{scenario}: {} baseline page queries returned rows",
                        tally.nonempty_pulls
                    ));
                }
                sql = Some((tally, meter.await?));
            }
        }
        let ((srv, srv_cpu), (sql, sql_cpu)) = (srv.unwrap(), sql.unwrap());
        let ratio = srv.req_per_s() / sql.req_per_s();
        let per_request = |cpu: f64, tally: &Tally| micros_per(cpu, tally.req_per_s() * tally.secs);
        let cpu = [
            per_request(srv_cpu.own, &srv),
            per_request(srv_cpu.postgres, &srv),
            per_request(sql_cpu.own, &sql),
            per_request(sql_cpu.postgres, &sql),
        ];
        eprintln!(
            "  run {run} ({} first): server {:.0} req/s ({}) | SQL {:.0} req/s ({}) | ratio {ratio:.2}",
            if server_first { "server" } else { "SQL" },
            srv.req_per_s(),
            quantiles(mix, &srv),
            sql.req_per_s(),
            quantiles(mix, &sql),
        );
        eprintln!(
            "  run {run}: CPU per request: server+client {:.0} µs + postgres {:.0} µs | SQL client {:.0} µs + postgres {:.0} µs",
            cpu[0], cpu[1], cpu[2], cpu[3]
        );
        cpu_runs.push(cpu);
        results.write(
            scenario,
            "run",
            json!({"run": run, "users": args.users, "connections": args.connections,
                "records_per_user": records, "server_first": server_first, "durable": args.durable,
                "server": srv.json(mix), "baseline": sql.json(mix), "ratio_req_per_s": ratio,
                "cpu_us_per_request": {"server_and_client": cpu[0], "server_postgres": cpu[1],
                    "baseline_client": cpu[2], "baseline_postgres": cpu[3]}}),
        );
        ratios.push(ratio);
        srv_runs.push(srv);
        sql_runs.push(sql);
    }
    let groups = server.shared.store.push_groups();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "  push groups: {} committed, {} failed; pushes {} written in groups, {} bounced",
        load(&groups.committed),
        load(&groups.failed),
        load(&groups.written),
        load(&groups.bounced)
    );
    server.stop().await;
    let cpu_median = |i: usize| median(&cpu_runs.iter().map(|c| c[i]).collect::<Vec<_>>());
    println!(
        "{scenario}: CPU per request (µs, medians): server+client {:.0}, its postgres {:.0} | SQL client {:.0}, its postgres {:.0}",
        cpu_median(0), cpu_median(1), cpu_median(2), cpu_median(3)
    );

    println!();
    println!(
        "{scenario} ({}; {} users, {} connections, {}; medians of {} runs; the ratio is the median of per-run ratios)",
        if args.durable { "durable cluster" } else { "non-durable cluster" },
        args.users, args.connections, shares.join(", "), args.runs
    );
    let ratio = median(&ratios);
    let mut header = "| side | req/s |".to_string();
    let mut rule = "|---|---:|".to_string();
    for (kind, _) in mix {
        header += &format!(" {0} p50 ms | {0} p99 ms |", kind.label());
        rule += "---:|---:|";
    }
    println!("{header} server/SQL req/s |");
    println!("{rule}---:|");
    let srv = summarise(
        mix,
        &srv_runs,
        "server (HTTP, JSON)",
        &format!("{ratio:.2}"),
    );
    let sql = summarise(mix, &sql_runs, "bare SQL, Go server's statements", "");
    results.write(
        scenario,
        "summary",
        json!({"users": args.users, "connections": args.connections,
            "records_per_user": records, "runs": args.runs, "durable": args.durable,
            "server": srv, "baseline": sql, "ratio_req_per_s_median": ratio}),
    );
    Ok(())
}

/// p50 and p99 of each kind, for the progress lines.
fn quantiles(mix: Mix, tally: &Tally) -> String {
    mix.iter()
        .zip(&tally.hists)
        .map(|((kind, _), h)| {
            let (p50, p99) = (ms(h.quantile(0.5)), ms(h.quantile(0.99)));
            format!("{} p50 {p50:.2} p99 {p99:.2} ms", kind.label())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints one side's row of the table (medians over the runs) and returns them as JSON.
fn summarise(mix: Mix, runs: &[Tally], name: &str, ratio_cell: &str) -> Value {
    let med = |f: &dyn Fn(&Tally) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let req_per_s = med(&|t| t.req_per_s());
    let mut row = format!("| {name} | {req_per_s:.0} |");
    let mut kinds = Map::new();
    for (k, (kind, _)) in mix.iter().enumerate() {
        let p50 = med(&|t| ms(t.hists[k].quantile(0.5)));
        let p99 = med(&|t| ms(t.hists[k].quantile(0.99)));
        row += &format!(" {p50:.2} | {p99:.2} |");
        kinds.insert(
            kind.label(),
            json!({"p50_ms_median": p50, "p99_ms_median": p99}),
        );
    }
    println!("{row} {ratio_cell} |");
    json!({"req_per_s_median": req_per_s, "kinds": kinds})
}

fn report_errors(results: &mut Results, scenario: &str, errors: &[String]) {
    for e in errors.iter().take(5) {
        results.error(format!("{scenario}: {e}"));
    }
    if errors.len() > 5 {
        results.errors += (errors.len() - 5) as u64;
        eprintln!("  ... {} more errors", errors.len() - 5);
    }
}
