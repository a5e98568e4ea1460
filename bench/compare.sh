#!/usr/bin/env bash
# bench/compare.sh - Postern and Postfix side by side, same sitting, same harness.
# Runs every case RUNS times (default 3), alternating Postfix and Postern, and prints one
# line per run: "relay case accepted/s delivered/s drain_s peak_rss_kb peak_pss_kb".
# Needs root (Postfix setup) and the postfix package (smtp-source, smtp-sink).
# CASES="4k-50s 100k-10s" runs only those cases; BASE_BIN=/path/to/older/postern also
# runs that binary (as "postern-base") in the same rotation, for before/after figures.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
# One binary for the whole sitting, copied so that edits in the tree cannot change it.
cargo build --release -q || exit 1
BIN=$(mktemp -d)/postern
cp target/release/postern "$BIN"
export BIN
LOGDIR=${LOGDIR:-$(mktemp -d)}
echo "# raw harness output in $LOGDIR" >&2
H=/work/shared/bench/relay-bench.sh
/work/shared/bench/postfix-setup.sh >/dev/null 2>&1 || { echo "postfix setup failed" >&2; exit 1; }
master_pid() { tr -d ' ' </var/spool/postfix/pid/master.pid; }
# case name | size | sessions | count | rcpts
cases=(
  "4k-1s 4096 1 1000 1"
  "4k-10s 4096 10 5000 1"
  "4k-50s 4096 50 10000 1"
  "100k-10s 102400 10 2000 1"
  "100rcpt-10s 4096 10 500 100"
)
summ() { # extract numbers from the harness output
  awk '/^accepted_per_s/ { for (i=1;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       /^# / { for (i=2;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       END { printf "%s %s %s %s %s\n", v["accepted_per_s"], v["delivered_per_s"], v["drain_s"], v["peak_rss_kb"], v["peak_pss_kb"] }'
}
for run in $(seq "$RUNS"); do
  for c in "${cases[@]}"; do
    read -r name size conc count rcpts <<<"$c"
    if [[ -n ${CASES:-} && " $CASES " != *" $name "* ]]; then continue; fi
    expect=$count
    (( rcpts > 50 )) && expect=$(( count * 2 ))   # both split 100 recipients into 2 transactions of 50
    out=$("$H" -r "$rcpts" -e "$expect" -Q 'test -z "$(postqueue -j)"' -w "$(master_pid)" \
          127.0.0.1:2525 2626 "$size" "$conc" "$count" 2>&1)
    echo "$out" >"$LOGDIR/postfix-$name-$run.txt"
    echo "postfix $name $(summ <<<"$out")"
    sleep 3
    out=$(PORT=2527 bench/relay.sh "$size" "$conc" "$count" "$rcpts" -e "$expect" 2>&1)
    echo "$out" >"$LOGDIR/postern-$name-$run.txt"
    echo "postern $name $(summ <<<"$out")"
    sleep 3
    if [[ -n ${BASE_BIN:-} ]]; then
      out=$(BIN=$BASE_BIN PORT=2527 bench/relay.sh "$size" "$conc" "$count" "$rcpts" -e "$expect" 2>&1)
      echo "$out" >"$LOGDIR/postern-base-$name-$run.txt"
      echo "postern-base $name $(summ <<<"$out")"
      sleep 3
    fi
  done
done
postfix stop >/dev/null 2>&1
