#!/bin/sh
# Runs every scenario at the sizes reported in BENCHMARKS.md; tables go to results/*.txt, JSON lines to
# results/results.jsonl. Build first: (cd .. && cargo build --release) && cargo build --release
set -u
cd "$(dirname "$0")"
B=./target/release/mana-sync-bench
mkdir -p results
$B footprint   --runs 3 --load-secs 5                                  > results/footprint.txt
$B push        --runs 3 --warm 1 --secs 2                              > results/push.txt
$B push        --runs 3 --warm 1 --secs 2 --durable --batches 20,200 --devices 16 --one-user none > results/push-durable.txt
$B empty-pull  --runs 3                                                 > results/empty-pull.txt
$B mix         --runs 3                                                 > results/mix.txt
$B notify      --runs 3 --sockets 1,100,1000 --rounds 100 --warm-rounds 10 --others 100 > results/notify.txt
$B pull        --runs 3 --rows 1000000 --rows-per-user 10000 --requests 500 --warm-requests 50 > results/pull.txt
$B connections --runs 3 --sockets 15000 --sources 4 --per-user 3       > results/connections.txt
