//! Scenario `connections`: as many authenticated idle `/ws` sockets as the file limit allows, held against
//! the release binary run as a child process (`mana-sync serve`), so the server and the load tool each have
//! their own 20,000-descriptor budget. Reports the server's RSS before and after, and bytes per connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

pub struct Args {
    pub runs: usize,
    pub sockets: usize,
    pub sources: usize,
    pub per_user: usize,
}

pub async fn run(args: Args, results: &mut Results) -> Result<()> {
    let cluster = Cluster::start(false).await?;
    let outcome = run_inner(&args, &cluster, results).await;
    cluster.stop().await;
    outcome
}

async fn run_inner(args: &Args, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let keys = Keys::create()?;
    let nonce = mana_sync::clock::unix_now();
    println!(
        "connections: {} sockets per run from {} source addresses (127.0.0.2..), {} sockets per user, server = child process {}",
        args.sockets, args.sources, args.per_user, server_binary().display()
    );
    let mut per_conn_runs = Vec::new();
    let mut rows = Vec::new();
    for run in 0..args.runs {
        let child = Child::start(cluster, &keys, &[]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle, _) = rss(child.pid)?;
        let addr = child.addr;
        let gate = Arc::new(Semaphore::new(256));
        let started = Instant::now();
        let mut opening = Vec::with_capacity(args.sockets);
        for i in 0..args.sockets {
            let token = keys.token(&format!("c{nonce}r{run}-u{}", i / args.per_user.max(1)));
            let source: IpAddr = format!("127.0.0.{}", 2 + i % args.sources.max(1))
                .parse()
                .unwrap();
            let gate = gate.clone();
            opening.push(tokio::spawn(async move {
                let _p = gate.acquire_owned().await.unwrap();
                authed_ws(addr, Some(source), &token, &format!("dev-{i}")).await
            }));
        }
        let mut sockets = Vec::with_capacity(args.sockets);
        let mut failures = Vec::new();
        for h in opening {
            match h.await? {
                Ok(ws) => sockets.push(ws),
                Err(e) => failures.push(e.to_string()),
            }
        }
        let open_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (after, hwm) = rss(child.pid)?;
        let (client_rss, _) = rss(std::process::id())?;
        // The server's own count, and a sample of sockets that must still answer.
        let mut hc = HttpConn::connect(addr, None).await?;
        let (_, health) = hc.get("/health", None).await?;
        let health: serde_json::Value = serde_json::from_slice(&health).unwrap_or_default();
        let step = (sockets.len() / 100).max(1);
        let mut dead = 0;
        for ws in sockets.iter_mut().step_by(step) {
            let ok = async {
                ws.send(Message::text(json!({"type": "ping"}).to_string()))
                    .await
                    .ok()?;
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), ws.next())
                        .await
                        .ok()??
                    {
                        Ok(Message::Text(t)) if t.as_str().contains("pong") => return Some(()),
                        Ok(Message::Text(_)) | Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {
                            continue
                        }
                        _ => return None,
                    }
                }
            }
            .await;
            if ok.is_none() {
                dead += 1;
            }
        }
        let n = sockets.len();
        let per_conn = (after as f64 - idle as f64) / n.max(1) as f64;
        eprintln!(
            "  run {run}: {n} open ({} failed) in {open_secs:.1} s; server RSS {} -> {} (peak {}), {:.0} B/connection; health connections {}; {dead} of the sampled sockets did not answer ping; load tool RSS {}",
            failures.len(), fmt_bytes(idle as f64), fmt_bytes(after as f64), fmt_bytes(hwm as f64), per_conn,
            health["connections"], fmt_bytes(client_rss as f64)
        );
        for f in failures.iter().take(5) {
            results.error(format!("connections run {run}: socket failed: {f}"));
        }
        results.errors += failures.len().saturating_sub(5) as u64;
        if dead > 0 {
            results.error(format!(
                "connections run {run}: {dead} sampled sockets did not answer ping"
            ));
        }
        results.write("connections", "run", json!({"run": run, "sockets": n, "failed": failures.len(),
            "open_secs": open_secs, "server_rss_idle": idle, "server_rss_after": after, "server_vmhwm": hwm,
            "bytes_per_connection": per_conn, "health_connections": health["connections"],
            "sampled_dead": dead, "load_tool_rss": client_rss}));
        per_conn_runs.push(per_conn);
        rows.push((n, idle, after));
        drop(sockets);
        child.stop().await;
    }
    let per_conn = median(&per_conn_runs);
    let idle = median(&rows.iter().map(|r| r.1 as f64).collect::<Vec<_>>());
    let after = median(&rows.iter().map(|r| r.2 as f64).collect::<Vec<_>>());
    let n = median(&rows.iter().map(|r| r.0 as f64).collect::<Vec<_>>());
    let projection = idle + 100_000.0 * per_conn;
    println!();
    println!(
        "connections (child server process; medians of {} runs)",
        args.runs
    );
    println!("| sockets held | server RSS idle | server RSS with sockets | bytes per connection | PROJECTION: RSS at 100k sockets |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {n:.0} | {} | {} | {per_conn:.0} B ({}) | {} (projected, not measured) |",
        fmt_bytes(idle),
        fmt_bytes(after),
        fmt_bytes(per_conn),
        fmt_bytes(projection)
    );
    results.write("connections", "summary", json!({"runs": args.runs, "sockets": n, "server_rss_idle": idle,
        "server_rss_after": after, "bytes_per_connection": per_conn, "projected_rss_100k": projection,
        "projection": true}));
    Ok(())
}
