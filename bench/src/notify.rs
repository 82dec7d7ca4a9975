//! Scenario `notify`: latency from just before a push request is sent to the arrival of `sync-available`
//! at each of N authenticated `/ws` sockets of the pushing user (other devices), while sockets of other
//! users are connected too and must receive nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::hist::{ms, Histogram};

pub struct Args {
    pub runs: usize,
    pub sockets: Vec<usize>,
    pub rounds: usize,
    pub warm_rounds: usize,
    pub others: usize,
    pub child: bool,
}

enum Event {
    Notified(usize, Instant),
    Closed(usize, String),
}

/// Opens `count` authenticated sockets (at most 200 handshakes in flight) and spawns a reader per socket
/// that reports every `sync-available` (and any close) on `tx`.
async fn open_sockets(
    addr: std::net::SocketAddr,
    keys: &Keys,
    user_of: impl Fn(usize) -> String,
    count: usize,
    tx: mpsc::UnboundedSender<Event>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let gate = Arc::new(Semaphore::new(200));
    let mut opening = Vec::with_capacity(count);
    for i in 0..count {
        let token = keys.token(&user_of(i));
        let gate = gate.clone();
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            authed_ws(addr, None, &token, &format!("sock-{i}")).await
        }));
    }
    let mut readers = Vec::with_capacity(count);
    for (i, h) in opening.into_iter().enumerate() {
        let mut ws = h.await?.map_err(|e| err(format!("socket {i}: {e}")))?;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Text(t)) => {
                        let now = Instant::now();
                        if t.as_str().contains("\"sync-available\"") {
                            let _ = tx.send(Event::Notified(i, now));
                        } else {
                            let _ = tx.send(Event::Closed(i, format!("unexpected message {t}")));
                        }
                    }
                    Ok(Message::Close(f)) => {
                        let _ = tx.send(Event::Closed(i, format!("closed: {f:?}")));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Event::Closed(i, format!("error: {e}")));
                        return;
                    }
                }
            }
        }));
    }
    Ok(readers)
}

struct CellResult {
    hist: Histogram,
    push_hist: Histogram,
    missing: u64,
    duplicates: u64,
    leaked: u64,
    closed: Vec<String>,
}

async fn cell(
    addr: std::net::SocketAddr,
    keys: &Keys,
    tag: &str,
    n: usize,
    args: &Args,
) -> Result<CellResult> {
    let user = format!("{tag}-u");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (other_tx, mut other_rx) = mpsc::unbounded_channel();
    let u = user.clone();
    let mine = open_sockets(addr, keys, move |_| u.clone(), n, tx).await?;
    let t = tag.to_string();
    let others = open_sockets(
        addr,
        keys,
        move |i| format!("{t}-other{}", i % 10),
        args.others,
        other_tx,
    )
    .await?;

    let token = format!("Bearer {}", keys.token(&user));
    let mut conn = HttpConn::connect(addr, None).await?;
    let mut since = LOG_START.to_string();
    let mut res = CellResult {
        hist: Histogram::new(),
        push_hist: Histogram::new(),
        missing: 0,
        duplicates: 0,
        leaked: 0,
        closed: Vec::new(),
    };
    let mut seen = vec![0u32; n];
    for round in 0..(args.warm_rounds + args.rounds) {
        let measured = round >= args.warm_rounds;
        let body = json!({"clientId": "pusher", "since": since, "changes": [
            {"table": "tasks", "id": format!("t{round}"), "op": "insert", "data": {"title": format!("round {round}")}}
        ]});
        let t0 = Instant::now();
        let (status, resp) = conn
            .send(
                "POST",
                "/sync/todo",
                &[
                    ("authorization", &token),
                    ("content-type", "application/json"),
                    ("x-client-id", "pusher"),
                ],
                Bytes::from(body.to_string()),
            )
            .await?;
        let push_took = t0.elapsed();
        if status != 200 {
            return Err(err(format!(
                "push answered {status}: {}",
                String::from_utf8_lossy(&resp)
            )));
        }
        since = synced_until(&resp).ok_or_else(|| err("push response without syncedUntil"))?;
        if measured {
            res.push_hist.record_duration(push_took);
        }
        seen.iter_mut().for_each(|s| *s = 0);
        let mut got = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Notified(i, at))) => {
                    if seen[i] > 0 {
                        res.duplicates += 1;
                        continue;
                    }
                    seen[i] += 1;
                    got += 1;
                    if measured {
                        res.hist.record_duration(at.saturating_duration_since(t0));
                    }
                }
                Ok(Some(Event::Closed(i, why))) => res.closed.push(format!("socket {i}: {why}")),
                Ok(None) | Err(_) => break,
            }
        }
        if got < n {
            res.missing += (n - got) as u64;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Late duplicates, and anything that reached another user's socket.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Notified(..) => res.duplicates += 1,
            Event::Closed(i, why) => res.closed.push(format!("socket {i}: {why}")),
        }
    }
    while let Ok(ev) = other_rx.try_recv() {
        match ev {
            Event::Notified(..) => res.leaked += 1,
            Event::Closed(i, why) => res.closed.push(format!("other user's socket {i}: {why}")),
        }
    }
    for h in mine.into_iter().chain(others) {
        h.abort();
    }
    Ok(res)
}

pub async fn run(args: Args, results: &mut Results) -> Result<()> {
    let cluster = Cluster::start(false).await?;
    let outcome = run_inner(&args, &cluster, results).await;
    cluster.stop().await;
    outcome
}

async fn run_inner(args: &Args, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let keys = Keys::create()?;
    let (addr, in_process, child) = if args.child {
        let c = Child::start(cluster, &keys, &[]).await?;
        (c.addr, None, Some(c))
    } else {
        let s = InProcess::start(cluster, &keys).await?;
        (s.addr, Some(s), None)
    };
    let mode = if args.child {
        "child process (release binary of the main crate)"
    } else {
        "in-process"
    };
    println!("notify: server {mode} on {addr}; {} other users' sockets connected; {} rounds after {} warm-up per run",
        args.others, args.rounds, args.warm_rounds);
    let nonce = mana_sync::clock::unix_now();
    let mut per_n: std::collections::BTreeMap<usize, Vec<(Histogram, Histogram)>> =
        Default::default();
    let mut leaked_total = 0;
    for run in 0..args.runs {
        for &n in &args.sockets {
            let tag = format!("n{nonce}r{run}s{n}");
            let r = cell(addr, &keys, &tag, n, args).await?;
            eprintln!(
                "  run {run}: {n} sockets: p50 {:.2} p99 {:.2} max {:.2} ms (push response p50 {:.2} ms); missing {}, duplicates {}, other users' sockets got {}",
                ms(r.hist.quantile(0.5)), ms(r.hist.quantile(0.99)), ms(r.hist.max()), ms(r.push_hist.quantile(0.5)),
                r.missing, r.duplicates, r.leaked
            );
            if r.missing > 0 {
                results.error(format!(
                    "{n} sockets, run {run}: {} notifications never arrived (5 s)",
                    r.missing
                ));
            }
            if r.leaked > 0 {
                results.error(format!(
                    "{n} sockets, run {run}: other users' sockets received {} notifications",
                    r.leaked
                ));
            }
            for c in r.closed.iter().take(5) {
                results.error(format!("{n} sockets, run {run}: {c}"));
            }
            leaked_total += r.leaked;
            results.write("notify", "run", json!({"run": run, "sockets": n, "other_users_sockets": args.others,
                "server": mode, "latency": r.hist.summary_ms(), "push_response": r.push_hist.summary_ms(),
                "missing": r.missing, "duplicates": r.duplicates, "other_users_received": r.leaked}));
            per_n.entry(n).or_default().push((r.hist, r.push_hist));
        }
    }
    let med = |hs: &[(Histogram, Histogram)], q: f64, push: bool| {
        median(
            &hs.iter()
                .map(|h| ms(if push { &h.1 } else { &h.0 }.quantile(q)))
                .collect::<Vec<_>>(),
        )
    };
    println!();
    println!("notify ({mode}; medians of {} runs; latency from just before the push request to sync-available at each socket)", args.runs);
    println!("| sockets of the pushing user | p50 ms | p99 ms | max ms | push response p50 ms | other users' sockets notified |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (n, hs) in &per_n {
        println!(
            "| {n} | {:.2} | {:.2} | {:.2} | {:.2} | {leaked_total} of {} sockets |",
            med(hs, 0.5, false),
            med(hs, 0.99, false),
            med(hs, 1.0, false),
            med(hs, 0.5, true),
            args.others
        );
        results.write("notify", "summary", json!({"sockets": n, "server": mode, "runs": args.runs,
            "p50_ms": med(hs, 0.5, false), "p99_ms": med(hs, 0.99, false), "max_ms": med(hs, 1.0, false),
            "push_p50_ms": med(hs, 0.5, true), "other_users_received_total": leaked_total}));
    }
    if let Some(s) = in_process {
        s.stop().await;
    }
    if let Some(c) = child {
        c.stop().await;
    }
    Ok(())
}
