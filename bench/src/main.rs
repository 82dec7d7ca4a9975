//! mana-sync-bench: starts a throwaway PostgreSQL and the real mana-sync server, drives it over real
//! sockets, prints a table per scenario and appends JSON lines to a results file. Exits non-zero only on
//! errors (failed or lost requests, a socket that missed its notification), never on timing.

/// The allocator the shipped binary uses (src/bin/mana-sync.rs), for the server compiled in here.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
mod connections;
mod cpu;
mod edge;
mod footprint;
mod hist;
mod hot;
mod notify;
mod pull;
mod push;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{Result, Results};

const USAGE: &str = "\
mana-sync-bench SCENARIO [--option value ...]

Scenarios:
  push         changes/s vs raw ingest and one-transaction-per-change
               --batches 1,20,200 --devices 1,4,16,64 --one-user 16 --warm 1 --secs 3 [--durable]
  pull         p50/p99 of 1,000-row pages vs the same SQL run directly
               --rows 1000000 --rows-per-user 10000 --requests 500 --warm-requests 50
  empty-pull   req/s, p50/p99 of pulls with nothing new (the 30 s poll) vs the Go server's SQL for them
               --users 64 --connections 16 --warm 1 --secs 5 [--durable]
  mix          90 % empty pulls, 9 % pushes of 1 change, 1 % of 20; req/s, p50/p99 per kind vs the same mix
               as the Go server's SQL
               --users 1000 --connections 16 --warm 1 --secs 5 [--durable]
  notify       push -> sync-available latency to N sockets of the pushing user (+ other users' sockets)
               --sockets 1,100,1000 --rounds 100 --warm-rounds 10 --others 100 [--child]
  connections  idle authenticated WebSockets held by a child server process; RSS per connection
               --sockets 15000 --sources 4 --per-user 3
  footprint    idle RSS, RSS under push load, stripped binary size (child server process)
               --load-secs 5
  tls          push of 1 and empty pull over plain HTTP/1.1, TLS HTTP/1.1, h2c and TLS HTTP/2 (same run)
               --connections 16 --warm 1 --secs 3
  all          every scenario with its defaults

Common: --runs 3 (runs per figure; medians are reported) --out results/results.jsonl
The child-process scenarios run ../target/release/mana-sync (override with MANA_SYNC_BIN).";

struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut map = HashMap::new();
        let mut i = 0;
        while i < args.len() {
            let key = args[i].strip_prefix("--").ok_or_else(|| {
                common::err(format!("unexpected argument {}\n\n{USAGE}", args[i]))
            })?;
            if matches!(key, "durable" | "child") {
                map.insert(key.to_string(), "true".to_string());
                i += 1;
                continue;
            }
            let value = args
                .get(i + 1)
                .ok_or_else(|| common::err(format!("--{key} needs a value")))?;
            map.insert(key.to_string(), value.clone());
            i += 2;
        }
        Ok(Opts(map))
    }
    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| common::err(format!("--{key}: not a number: {v}"))),
        }
    }
    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| common::err(format!("--{key}: not a number: {v}"))),
        }
    }
    fn list(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.0.get(key) {
            None => Ok(default.to_vec()),
            Some(v) if v.is_empty() || v == "none" => Ok(Vec::new()),
            Some(v) => v
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse()
                        .map_err(|_| common::err(format!("--{key}: bad list {v}")))
                })
                .collect(),
        }
    }
    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

async fn scenario(name: &str, o: &Opts, results: &mut Results) -> Result<()> {
    let runs = o.usize("runs", 3)?;
    match name {
        "push" => {
            push::run(
                push::Args {
                    runs,
                    warm: Duration::from_secs_f64(o.f64("warm", 1.0)?),
                    dur: Duration::from_secs_f64(o.f64("secs", 3.0)?),
                    batches: o.list("batches", &[1, 20, 200])?,
                    devices: o.list("devices", &[1, 4, 16, 64])?,
                    one_user_devices: o.list("one-user", &[16])?,
                    durable: o.flag("durable"),
                },
                results,
            )
            .await
        }
        "pull" => {
            pull::run(
                pull::Args {
                    runs,
                    rows: o.usize("rows", 1_000_000)?,
                    rows_per_user: o.usize("rows-per-user", 10_000)?,
                    requests: o.usize("requests", 500)?,
                    warm_requests: o.usize("warm-requests", 50)?,
                },
                results,
            )
            .await
        }
        "empty-pull" | "mix" => {
            let default_users = if name == "mix" { 1000 } else { 64 };
            let args = hot::Args {
                runs,
                users: o.usize("users", default_users)?,
                connections: o.usize("connections", 16)?,
                warm: Duration::from_secs_f64(o.f64("warm", 1.0)?),
                dur: Duration::from_secs_f64(o.f64("secs", 5.0)?),
                durable: o.flag("durable"),
            };
            if name == "mix" {
                hot::run_mix(args, results).await
            } else {
                hot::run_empty_pull(args, results).await
            }
        }
        "notify" => {
            notify::run(
                notify::Args {
                    runs,
                    sockets: o.list("sockets", &[1, 100, 1000])?,
                    rounds: o.usize("rounds", 100)?,
                    warm_rounds: o.usize("warm-rounds", 10)?,
                    others: o.usize("others", 100)?,
                    child: o.flag("child"),
                },
                results,
            )
            .await
        }
        "connections" => {
            connections::run(
                connections::Args {
                    runs,
                    sockets: o.usize("sockets", 15_000)?,
                    sources: o.usize("sources", 4)?,
                    per_user: o.usize("per-user", 3)?,
                },
                results,
            )
            .await
        }
        "footprint" => {
            footprint::run(
                footprint::Args {
                    runs,
                    load_secs: o.f64("load-secs", 5.0)?,
                },
                results,
            )
            .await
        }
        "tls" => {
            edge::run(
                edge::Args {
                    runs,
                    connections: o.usize("connections", 16)?,
                    warm: Duration::from_secs_f64(o.f64("warm", 1.0)?),
                    dur: Duration::from_secs_f64(o.f64("secs", 3.0)?),
                },
                results,
            )
            .await
        }
        other => Err(common::err(format!("unknown scenario {other}\n\n{USAGE}"))),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args[0] == "--help" || args[0] == "-h" {
        println!("{USAGE}");
        return;
    }
    let opts = match Opts::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let out =
        opts.0.get("out").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/results.jsonl")
        });
    let mut results = Results::new(out.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let names: Vec<&str> = if args[0] == "all" {
        vec![
            "footprint",
            "push",
            "empty-pull",
            "mix",
            "notify",
            "pull",
            "connections",
        ]
    } else {
        vec![args[0].as_str()]
    };
    let mut failed = false;
    for name in names {
        if let Err(e) = rt.block_on(scenario(name, &opts, &mut results)) {
            eprintln!("ERROR: scenario {name} failed: {e}");
            failed = true;
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    eprintln!("results appended to {}", out.display());
    if failed || results.errors > 0 {
        eprintln!("{} errors", results.errors + failed as u64);
        std::process::exit(1);
    }
}
