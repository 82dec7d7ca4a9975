//! Scenario `footprint`: the release binary's size, the server's idle RSS after start and its RSS under a
//! push load (16 devices of distinct users, batches of 20), run as a child process (`mana-sync serve`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use crate::common::*;

pub struct Args {
    pub runs: usize,
    pub load_secs: f64,
}

pub async fn run(args: Args, results: &mut Results) -> Result<()> {
    let cluster = Cluster::start(false).await?;
    let outcome = run_inner(&args, &cluster, results).await;
    cluster.stop().await;
    outcome
}

async fn run_inner(args: &Args, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let keys = Keys::create()?;
    let bin = server_binary();
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "footprint: {} ({} bytes, stripped by the release profile)",
        bin.display(),
        size
    );
    let nonce = mana_sync::clock::unix_now();
    let mut idle_runs = Vec::new();
    let mut load_runs = Vec::new();
    let mut after_runs = Vec::new();
    let mut rate_runs = Vec::new();
    for run in 0..args.runs {
        let child = Child::start(cluster, &keys, &[]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (idle, _) = rss(child.pid)?;
        let peak = Arc::new(AtomicU64::new(idle));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop, pid) = (peak.clone(), stop.clone(), child.pid);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((r, _)) = rss(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let end = Instant::now() + Duration::from_secs_f64(args.load_secs);
        let mut devices = Vec::new();
        for d in 0..16 {
            let addr = child.addr;
            let user = format!("f{nonce}r{run}u{d}");
            let token = format!("Bearer {}", keys.token(&user));
            devices.push(tokio::spawn(async move {
                let mut conn = HttpConn::connect(addr, None).await?;
                let mut since = LOG_START.to_string();
                let mut changes = 0u64;
                let mut seq = 0u64;
                while Instant::now() < end {
                    let batch: Vec<_> = (0..20)
                        .map(|_| {
                            seq += 1;
                            json!({"table": "tasks", "id": format!("r{seq}"), "op": "insert",
                                   "data": {"title": format!("Task {seq}"), "done": false}})
                        })
                        .collect();
                    let body =
                        json!({"clientId": "dev", "since": since, "changes": batch}).to_string();
                    let (status, resp) = conn
                        .send(
                            "POST",
                            "/sync/todo",
                            &[
                                ("authorization", &token),
                                ("content-type", "application/json"),
                                ("x-client-id", "dev"),
                            ],
                            Bytes::from(body),
                        )
                        .await?;
                    if status != 200 {
                        return Err(err(format!(
                            "push answered {status}: {}",
                            String::from_utf8_lossy(&resp)
                        )));
                    }
                    since = synced_until(&resp).ok_or_else(|| err("no syncedUntil"))?;
                    changes += 20;
                }
                Ok::<u64, BoxError>(changes)
            }));
        }
        let mut changes = 0;
        for d in devices {
            match d.await? {
                Ok(c) => changes += c,
                Err(e) => results.error(format!("footprint load: {e}")),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.await;
        let (after, hwm) = rss(child.pid)?;
        let peak = peak.load(Ordering::Relaxed).max(hwm);
        let rate = changes as f64 / args.load_secs;
        eprintln!("  run {run}: idle RSS {}, peak under push load {} ({rate:.0} changes/s), after load {}",
            fmt_bytes(idle as f64), fmt_bytes(peak as f64), fmt_bytes(after as f64));
        results.write(
            "footprint",
            "run",
            json!({"run": run, "binary_bytes": size, "idle_rss": idle,
            "load_peak_rss": peak, "after_load_rss": after, "load_changes_per_s": rate}),
        );
        idle_runs.push(idle as f64);
        load_runs.push(peak as f64);
        after_runs.push(after as f64);
        rate_runs.push(rate);
        child.stop().await;
    }
    println!();
    println!(
        "footprint (child server process, medians of {} runs)",
        args.runs
    );
    println!("| stripped release binary | idle RSS after start | peak RSS under push load (16 devices x batch 20) | RSS after load |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} ({size} B) | {} | {} ({:.0} changes/s) | {} |",
        fmt_bytes(size as f64),
        fmt_bytes(median(&idle_runs)),
        fmt_bytes(median(&load_runs)),
        median(&rate_runs),
        fmt_bytes(median(&after_runs))
    );
    results.write("footprint", "summary", json!({"runs": args.runs, "binary_bytes": size, "idle_rss": median(&idle_runs),
        "load_peak_rss": median(&load_runs), "after_load_rss": median(&after_runs), "load_changes_per_s": median(&rate_runs)}));
    Ok(())
}
