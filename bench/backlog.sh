#!/usr/bin/env bash
# bench/backlog.sh - a queue of a million (issue 14): TOTAL messages to a next hop that is
# down, so every one stays queued. Reports, at each STEP: messages queued, the accept rate
# into the backlog, Postern's RSS and the spool's size; then a restart (time until the
# listener's 220, RSS once the backlog is loaded, time to load it); then the next hop
# comes back (smtp-sink) and `postern queue flush`: time to drain and the drain rate.
# Loopback only.
#
# Usage: bench/backlog.sh [TOTAL=1000000] [STEP=100000] [SESSIONS=50] [SIZE=4096]
# Env: BIN (default: cargo build --release), PORT (2525), SINK_PORT (2626),
#      METRICS_PORT (9925), POSTFIX=N: then queue N messages through Postfix (set up by
#      ../shared/bench/postfix-setup.sh on 127.0.0.1:2525) to the same dead next hop and
#      time its drain the same way (`postqueue -f`).
#      OPS=1: instead of the drain, time the queue commands on the whole backlog (the hop
#      still down): `queue list` (first line, whole listing), `list --json`,
#      `list --domain` (every message, then none), `flush`, and `delete --domain`, which
#      empties the queue; then a restart shows whether anything deleted came back.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-1000000} STEP=${2:-100000} SESS=${3:-50} SIZE=${4:-4096}
PORT=${PORT:-2525} SINK_PORT=${SINK_PORT:-2626} METRICS_PORT=${METRICS_PORT:-9925}
BIN=${BIN:-}
if [[ -z $BIN ]]; then cargo build --release -q; BIN=./target/release/postern; fi
command -v smtp-source >/dev/null || { echo "needs smtp-source (Debian postfix)" >&2; exit 2; }
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "port $PORT is taken: stop what listens there first" >&2; exit 2
fi
sink_user=(); (( EUID == 0 )) && sink_user=(-u nobody)
tmp=$(mktemp -d /tmp/backlog.XXXXXX)
cat >"$tmp/postern.toml" <<CONF
hostname = "bench.local"
spool_dir = "$tmp/spool"

[[listener]]
address = "127.0.0.1:$PORT"
max_connections = 5000
per_ip_connections = 5000

[relay]
trusted_networks = ["127.0.0.1/32"]

[[route]]
domains = ["*"]
next_hop = "[127.0.0.1]:$SINK_PORT"
tls = "none"

[delivery]
max_concurrency = 100
per_domain_concurrency = 20
retry_schedule = ["4h"]

[metrics]
address = "127.0.0.1:$METRICS_PORT"
CONF
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round($(now) - $1, 2))"; }
rss() { awk '/^VmRSS/{printf "%.0f", $2/1024}' "/proc/$pid/status"; }
metric() { curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# Time until the listener's 220 banner (not only the TCP accept).
banner() {
  python3 - "$PORT" <<'PY'
import socket, sys, time
port = int(sys.argv[1]); t0 = time.time()
while time.time() - t0 < 600:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        if s.recv(3) == b"220":
            s.sendall(b"QUIT\r\n"); s.close(); break
    except OSError:
        time.sleep(0.01)
PY
}
# Starts Postern; sets pid, and t to the seconds until its first 220.
start() {
  local t0; t0=$(now)
  RUST_LOG=warn "$BIN" serve --config "$tmp/postern.toml" >>"$tmp/log" 2>&1 &
  pid=$!
  banner
  kill -0 "$pid" 2>/dev/null || { echo "postern did not start: $(tail -3 "$tmp/log")" >&2; exit 1; }
  t=$(since "$t0")
}

echo "# postern $($BIN --version 2>/dev/null || echo) ; $TOTAL x $SIZE B, $SESS sessions, next hop [127.0.0.1]:$SINK_PORT down"
start
echo "# start: first 220 after ${t} s, rss_mb=$(rss)"
queued=0
while (( queued < TOTAL )); do
  n=$(( STEP < TOTAL - queued ? STEP : TOTAL - queued ))
  t0=$(now)
  timeout 1800 smtp-source -s "$SESS" -m "$n" -l "$SIZE" -f a@src.test -t u@far.test "127.0.0.1:$PORT"
  elapsed=$(since "$t0")
  queued=$(( queued + n ))
  echo "queued=$queued accept_per_s=$(python3 -c "print(round($n / $elapsed))") rss_mb=$(rss) spool_mb=$(du -sm "$tmp/spool" | cut -f1) queue_messages=$(metric postern_queue_messages) load=$(cut -d' ' -f1 /proc/loadavg)"
done
echo "# log lines so far: $(wc -l <"$tmp/log") ; deliveries deferred: $(metric 'postern_deliveries_total{status="deferred"}')"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
start
t0=$(now)
echo "# restart with $queued queued: first 220 after ${t} s, rss_mb=$(rss)"
while [[ "$(metric postern_queue_loading)" != "0" ]]; do sleep 0.2; done
echo "# backlog loaded $(since "$t0") s after the 220: queue_messages=$(metric postern_queue_messages) rss_mb=$(rss)"
sleep 10
echo "# 10 s later: rss_mb=$(rss) deferred_since_restart=$(metric 'postern_deliveries_total{status="deferred"}') suspended=$(metric postern_queue_destinations_suspended)"
if [[ -n ${OPS:-} ]]; then
  cfg=(--config "$tmp/postern.toml")
  # Seconds until the first line and until the end, and the lines, of a command's output.
  timed() {
    python3 - "$@" <<'PY'
import subprocess, sys, time
t0 = time.time(); first = None; lines = 0
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
for line in p.stdout:
    if first is None: first = time.time() - t0
    lines += 1
p.wait()
print(f"first_line_s={first if first is None else round(first, 3)} total_s={round(time.time() - t0, 2)} lines={lines} exit={p.returncode}")
PY
  }
  echo "queue_list $(timed "$BIN" queue list "${cfg[@]}") rss_mb=$(rss)"
  echo "queue_list_json $(timed "$BIN" queue list --json "${cfg[@]}")"
  echo "queue_list_domain_all $(timed "$BIN" queue list --domain far.test "${cfg[@]}")"
  echo "queue_list_domain_none $(timed "$BIN" queue list --domain elsewhere.test "${cfg[@]}")"
  echo "queue_flush $(timed "$BIN" queue flush "${cfg[@]}")"
  t0=$(now)
  out=$("$BIN" queue delete --domain far.test "${cfg[@]}")
  echo "queue_delete_domain s=$(since "$t0") rss_mb=$(rss) answer=\"$out\" spool_mb=$(du -sm "$tmp/spool" | cut -f1)"
  sleep 6
  echo "# 6 s later: queue_messages=$(metric postern_queue_messages) rss_mb=$(rss) spool_mb=$(du -sm "$tmp/spool" | cut -f1)"
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
  start
  while [[ "$(metric postern_queue_loading)" != "0" ]]; do sleep 0.2; done
  echo "# after kill -9 and a restart: first 220 after ${t} s, queue_messages=$(metric postern_queue_messages)"
  exit 0
fi
# The next hop comes back; the admin flushes.
smtp-sink "${sink_user[@]}" -c "127.0.0.1:$SINK_PORT" 1000 >/dev/null 2>&1 &
sink=$!
sleep 0.5
kill -0 "$sink" || { echo "smtp-sink did not start" >&2; exit 1; }
t0=$(now)
"$BIN" queue flush --config "$tmp/postern.toml"
while [[ "$(metric postern_queue_messages)" != "0" ]]; do sleep 0.5; done
d=$(since "$t0")
echo "drained=$queued drain_s=$d drain_per_s=$(python3 -c "print(round($queued / $d))") rss_mb=$(rss) spool_mb=$(du -sm "$tmp/spool" | cut -f1)"
kill "$sink" 2>/dev/null || true

if [[ -n ${POSTFIX:-} ]]; then
  # Postfix with the same dead next hop: queue POSTFIX messages, bring the hop back,
  # `postqueue -f`, time until its queue is empty.
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  # The reference relay (127.0.0.1:2525, bench.test -> [127.0.0.1]:SINK_PORT, durable).
  SINK="127.0.0.1:$SINK_PORT" /work/shared/bench/postfix-setup.sh >/dev/null
  sleep 1
  t0=$(now)
  smtp-source -s "$SESS" -m "$POSTFIX" -l "$SIZE" -f a@src.test -t u@bench.test 127.0.0.1:2525
  echo "postfix_queued=$POSTFIX accept_per_s=$(python3 -c "print(round($POSTFIX / $(since "$t0")))")"
  smtp-sink "${sink_user[@]}" -c "127.0.0.1:$SINK_PORT" 1000 >/dev/null 2>&1 &
  sink=$!
  sleep 0.5
  t0=$(now)
  postqueue -f
  while [[ -n "$(postqueue -j 2>/dev/null | head -c1)" ]]; do sleep 0.5; done
  d=$(since "$t0")
  echo "postfix_drained=$POSTFIX drain_s=$d drain_per_s=$(python3 -c "print(round($POSTFIX / $d))")"
  kill "$sink" 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
fi
