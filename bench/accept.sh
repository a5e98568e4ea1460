#!/usr/bin/env bash
# bench/accept.sh - acceptance throughput of Postern alone (no delivery): Postfix's
# smtp-source sends COUNT messages of SIZE bytes over CONC concurrent sessions to a
# release build of Postern on 127.0.0.1, and we time until every message got its 250
# (which Postern sends only after the message is fsynced).
#
# Usage: bench/accept.sh [SIZE=4096] [CONC=50] [COUNT=10000] [group|per-message]
# Needs smtp-source (Debian package postfix). Prints one line:
#   mode=... size=... sessions=... messages=... seconds=... accepted_per_s=... fsyncs=...
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-4096} CONC=${2:-50} COUNT=${3:-10000} MODE=${4:-group}
command -v smtp-source >/dev/null || { echo "install postfix for smtp-source" >&2; exit 2; }
cargo build --release -q
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/postern.toml" <<CONF
hostname = "bench.local"
spool_dir = "$tmp/spool"
max_message_size = "10MB"
[[listener]]
address = "127.0.0.1:$port"
max_connections = 2000
per_ip_connections = 2000
[relay]
accepted_domains = ["bench.test"]
trusted_networks = ["127.0.0.1/32"]
CONF
env=()
[[ $MODE == per-message ]] && env=(POSTERN_SPOOL_SYNC=per-message)
env "${env[@]}" RUST_LOG=warn ./target/release/postern serve --config "$tmp/postern.toml" 2>"$tmp/log" &
pid=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
start=$EPOCHREALTIME
smtp-source -c -s "$CONC" -m "$COUNT" -l "$SIZE" -f bench@bench.test -t rcpt@bench.test \
    "127.0.0.1:$port" >/dev/null
end=$EPOCHREALTIME
# The segment bytes are a cross-check that everything landed in the spool.
bytes=$(du -sb "$tmp/spool/log" | cut -f1)
awk -v s="$start" -v e="$end" -v n="$COUNT" -v m="$MODE" -v z="$SIZE" -v c="$CONC" -v b="$bytes" \
    'BEGIN { t = e - s; printf "mode=%s size=%d sessions=%d messages=%d seconds=%.2f accepted_per_s=%.0f spool_bytes=%d\n", m, z, c, n, t, n / t, b }'
