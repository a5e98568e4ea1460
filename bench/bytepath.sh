#!/usr/bin/env bash
# bench/bytepath.sh - relay CPU per message for one or more Postern binaries, interleaved
# (issue 15), beside what the harness's own two halves cost: smtp-source -> relay ->
# smtp-sink on loopback, one message per connection as relay-bench.sh sends them.
#
# Usage: bench/bytepath.sh BIN [BIN...]       (as root: smtp-sink runs as nobody)
# Env:   ROUNDS [5]  CASES ["4096:50:10000 102400:10:2000"] (size:sessions:messages)
#        HARNESS [1]: also smtp-source -> smtp-sink alone, each half's CPU per message
#        METRICS [0]: print the relay's spool fdatasyncs and accepted messages per run
#        PERF=" " (or perf options, e.g. "--call-graph dwarf,16384"): perf record -e
#            cpu-clock the relay during the run; the data file is named on stdout
#
# Per run, one line: case, binary, relay CPU ms/message (utime+stime of the relay and its
# threads, from /proc, over the run until the relay is idle), user and system parts,
# wall time, the 1-minute load average. Take medians over the rounds; the order of the
# binaries is the same in every round (base, new, base, new, ...).
set -u
ROUNDS=${ROUNDS:-5}
CASES=${CASES:-"4096:50:10000 102400:10:2000"}
HARNESS=${HARNESS:-1}
HZ=$(getconf CLK_TCK)
SINK_PORT=2626
RELAY_PORT=2527
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
command -v smtp-source >/dev/null || { echo "needs postfix's smtp-source and smtp-sink" >&2; exit 1; }

per_msg() { echo "$1 $2 $3" | awk '{ printf "%.3f", $1 * 1000 / $2 / $3 }'; }
ticks() { awk '{ print $14 + $16, $15 + $17 }' "/proc/$1/stat"; }
idle() { # waits until the process uses no CPU for 0.2 s
    local a b
    for _ in $(seq 600); do
        a=$(ticks "$1"); sleep 0.2; b=$(ticks "$1")
        [ "$a" = "$b" ] && return 0
    done
}
listening() { ss -ltnH "( sport = :$1 )" | grep -q .; }

relay_run() { # BIN SIZE CONC COUNT
    local bin=$1 size=$2 conc=$3 count=$4 w sink pid pp= u0 s0 u1 s1 t0 t1
    w=$(mktemp -d /tmp/bytepath.XXXXXX)
    cat > "$w/relay.toml" <<TOML
hostname = "relay.bench.test"
spool_dir = "$w/spool"
[[listener]]
address = "127.0.0.1:$RELAY_PORT"
tls = "none"
max_connections = 1000
per_ip_connections = 1000
[relay]
trusted_networks = ["127.0.0.1/32"]
[[route]]
domains = ["bench.test"]
next_hop = "127.0.0.1:$SINK_PORT"
TOML
    [ "${METRICS:-0}" = 1 ] && printf '[metrics]\naddress = "127.0.0.1:9199"\n' >> "$w/relay.toml"
    smtp-sink -u nobody "127.0.0.1:$SINK_PORT" 1000 > /dev/null 2>&1 &
    sink=$!
    "$bin" serve --config "$w/relay.toml" > "$w/log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do listening $RELAY_PORT && break; sleep 0.1; done
    sleep 0.3
    read -r u0 s0 < <(ticks $pid)
    if [ -n "${PERF:-}" ]; then
        # shellcheck disable=SC2086 # perf options, one word each
        perf record -e cpu-clock -F 2000 $PERF -p $pid -o "$w/perf.data" 2>/dev/null &
        pp=$!; sleep 0.5
    fi
    t0=$(date +%s.%N)
    smtp-source -s "$conc" -m "$count" -l "$size" -f a@x.test -t b@bench.test "127.0.0.1:$RELAY_PORT"
    idle $pid
    t1=$(date +%s.%N)
    read -r u1 s1 < <(ticks $pid)
    [ -n "$pp" ] && { kill -INT $pp; wait $pp 2>/dev/null; }
    echo "$size/$conc $(basename "$bin") cpu_ms=$(per_msg $((u1 - u0 + s1 - s0)) "$HZ" "$count") user_ms=$(per_msg $((u1 - u0)) "$HZ" "$count") sys_ms=$(per_msg $((s1 - s0)) "$HZ" "$count") wall_s=$(echo "$t1 $t0" | awk '{ printf "%.2f", $1 - $2 }') load=$(cut -d' ' -f1 /proc/loadavg)"
    [ "${METRICS:-0}" = 1 ] && curl -s 127.0.0.1:9199/metrics | grep -E '^postern_(spool_fsyncs|messages_accepted)_total' | sed 's/^/    /'
    kill $pid; wait $pid 2>/dev/null; kill $sink; wait $sink 2>/dev/null
    if [ -n "${PERF:-}" ]; then echo "    perf data: $w/perf.data"; else rm -rf "$w"; fi
}

harness_run() { # SIZE CONC COUNT: smtp-source -> smtp-sink, each half's CPU per message
    local size=$1 conc=$2 count=$3 sink su0 ss0 su1 ss1 cu cs
    smtp-sink -u nobody "127.0.0.1:$SINK_PORT" 1000 > /dev/null 2>&1 &
    sink=$!
    sleep 0.3
    read -r su0 ss0 < <(ticks $sink)
    read -r cu cs < <({ /usr/bin/time -f "%U %S" smtp-source -s "$conc" -m "$count" -l "$size" \
        -f a@x.test -t b@bench.test "127.0.0.1:$SINK_PORT" > /dev/null; } 2>&1)
    sleep 0.3
    read -r su1 ss1 < <(ticks $sink)
    echo "$size/$conc harness source_user_ms=$(per_msg "$cu" 1 "$count") source_sys_ms=$(per_msg "$cs" 1 "$count") sink_user_ms=$(per_msg $((su1 - su0)) "$HZ" "$count") sink_sys_ms=$(per_msg $((ss1 - ss0)) "$HZ" "$count") load=$(cut -d' ' -f1 /proc/loadavg)"
    kill $sink; wait $sink 2>/dev/null
}

for c in $CASES; do
    IFS=: read -r size conc count <<<"$c"
    for _ in $(seq "$ROUNDS"); do
        [ "$HARNESS" = 1 ] && harness_run "$size" "$conc" "$count"
        for bin in "$@"; do relay_run "$bin" "$size" "$conc" "$count"; done
    done
done
