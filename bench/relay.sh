#!/usr/bin/env bash
# bench/relay.sh - Postern end to end under the shared harness
# (/work/shared/bench/relay-bench.sh): smtp-source -> Postern 127.0.0.1:PORT ->
# smtp-sink 127.0.0.1:2626, with the same durability as the Postfix reference (every
# message fsynced before its 250).
#
# Usage: bench/relay.sh SIZE SESSIONS COUNT [RCPTS=1] [extra relay-bench.sh options...]
# e.g.   bench/relay.sh 4096 50 10000
#        bench/relay.sh 4096 10 1000 100
# Builds the release binary, writes a config to a temp dir, starts Postern, runs the
# harness with -w (peak RSS/PSS of Postern) and -Q (queue empty), stops Postern; prints
# Postern's CPU over the run as "# postern_cpu_s=..." (stderr, after the harness's lines).
# EXTRA_CONF is appended to the config (bench/milter.sh puts [[milter]] there); it
# starts inside [delivery], so keys of that section may come first. ACCEPTED and
# TRUSTED replace [relay]'s accepted_domains and trusted_networks (TOML lists).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=$1 CONC=$2 COUNT=$3 RCPTS=${4:-1}
shift $(( $# < 4 ? $# : 4 ))
HARNESS=${HARNESS:-/work/shared/bench/relay-bench.sh}
PORT=${PORT:-2525} SINK_PORT=${SINK_PORT:-2626}
BIN=${BIN:-}
if [[ -z $BIN ]]; then cargo build --release -q; BIN=./target/release/postern; fi
tmp=$(mktemp -d)
ACCEPTED=${ACCEPTED:-'[]'}
TRUSTED=${TRUSTED:-'["127.0.0.1/32"]'}
cat >"$tmp/postern.toml" <<CONF
hostname = "bench.local"
spool_dir = "$tmp/spool"
max_message_size = "10MB"
max_recipients = 1000

[[listener]]
address = "127.0.0.1:$PORT"
max_connections = 5000
per_ip_connections = 5000

[relay]
accepted_domains = $ACCEPTED
trusted_networks = $TRUSTED

[[route]]
domains = ["bench.test"]
next_hop = "[127.0.0.1]:$SINK_PORT"
tls = "none"

[delivery]
max_concurrency = 100
per_domain_concurrency = 20
${EXTRA_CONF:-}
CONF
RUST_LOG=${RUST_LOG:-warn} "$BIN" serve --config "$tmp/postern.toml" 2>"$tmp/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.05; done
# Not some other server on that port: ours must be running.
sleep 0.2
kill -0 "$pid" 2>/dev/null || { echo "# postern did not start: $(tail -3 "$tmp/log" | tr '\n' ' ')" >&2; exit 1; }
qempty="$BIN queue list --config $tmp/postern.toml | grep -q 'queue is empty'"
# Postern's own CPU over the run (utime + stime of all its threads, /proc/PID/stat).
ticks() { local st; read -ra st <"/proc/$1/stat"; echo $((st[13] + st[14])); }
t0=$(ticks "$pid")
rc=0
"$HARNESS" -r "$RCPTS" -w "$pid" -Q "$qempty" "$@" "127.0.0.1:$PORT" "$SINK_PORT" "$SIZE" "$CONC" "$COUNT" || rc=$?
awk -v t="$(( $(ticks "$pid") - t0 ))" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "# postern_cpu_s=%.2f\n", t / hz }' >&2
exit "$rc"
