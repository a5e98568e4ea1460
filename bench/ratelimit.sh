#!/usr/bin/env bash
# bench/ratelimit.sh - the cost of rate limits (issue 13): 4 KB x 50 sessions through
# Postern plain, with three [[rate_limit]]s counting every message (per client address,
# per sender, per sender domain; limits high enough never to refuse, so the cost is the
# counting), and with the same three limits shared through Redis ([cluster], a
# redis-server started here on a free port, no persistence). Runs interleaved in one
# sitting. Prints "postern CASE accepted/s delivered/s drain_s peak_rss_kb peak_pss_kb
# load=" per run. RUNS (default 3), COUNT (default 10000).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-10000}
cargo build --release -q || exit 1
BIN=$(mktemp -d)/postern
cp target/release/postern "$BIN"
export BIN
redis_dir=$(mktemp -d)
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$redis_dir" --daemonize no >"$redis_dir/log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; wait $redis_pid 2>/dev/null; rm -rf "$redis_dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
limits='
[[rate_limit]]
name = "per-ip"
per = "client_ip"
messages = 100000000
recipients = 100000000
window = "1h"

[[rate_limit]]
name = "per-sender"
per = "sender"
messages = 100000000
window = "1h"

[[rate_limit]]
name = "per-domain"
per = "sender_domain"
recipients = 100000000
window = "1h"
'
cluster="
[cluster]
redis = \"redis://127.0.0.1:$redis_port/0\"
node = \"bench\"
"
summ() {
  awk '/^accepted_per_s/ { for (i=1;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       /^# / { for (i=2;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       END { printf "%s %s %s %s %s\n", v["accepted_per_s"], v["delivered_per_s"], v["drain_s"], v["peak_rss_kb"], v["peak_pss_kb"] }'
}
for run in $(seq "$RUNS"); do
  for c in plain local redis; do
    case $c in
      plain) extra="" ;;
      local) extra=$limits ;;
      redis) extra="$limits$cluster"; redis-cli -p "$redis_port" flushall >/dev/null ;;
    esac
    out=$(EXTRA_CONF="$extra" PORT=2527 bench/relay.sh 4096 50 "$COUNT" 1 -e "$COUNT" 2>&1)
    echo "postern $c $(summ <<<"$out") load=$(cut -d' ' -f1 /proc/loadavg)"
    sleep 3
  done
done
echo "redis keys after the last run: $(redis-cli -p "$redis_port" dbsize)"
