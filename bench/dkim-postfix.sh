#!/usr/bin/env bash
# bench/dkim-postfix.sh - RSA-2048 DKIM signing side by side (issue 10): Postfix 3.7 with
# OpenDKIM as its milter, and Postern with [[dkim]], the same key, 4 KB x 50 sessions,
# alternating in one sitting. Prints "relay accepted/s delivered/s drain_s peak_rss_kb
# peak_pss_kb" per run. Needs root, postfix, opendkim. RUNS (default 3), COUNT (5000).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-5000}
cargo build --release -q || exit 1
BIN=$(mktemp -d)/postern
cp target/release/postern "$BIN"
export BIN
# OpenDKIM refuses files under a directory others may write (/tmp): a root-only one.
work=$(mktemp -d -p "${SAFE_DIR:-/root}")
DKIM_PORT=${DKIM_PORT:-2703}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  postconf -X smtpd_milters milter_protocol milter_default_action >/dev/null 2>&1
  postfix stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
"$BIN" dkim keygen bench-client.localdomain rsa --out "$work/rsa.pem" >/dev/null 2>&1
cat >"$work/opendkim.conf" <<CONF
Syslog no
Mode s
Domain bench-client.localdomain
Selector rsa
KeyFile $work/rsa.pem
Socket inet:$DKIM_PORT@127.0.0.1
InternalHosts 127.0.0.1
Canonicalization relaxed/relaxed
UserID root
PidFile $work/opendkim.pid
CONF
opendkim -f -x "$work/opendkim.conf" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/$DKIM_PORT) 2>/dev/null && break; sleep 0.05; done
H=/work/shared/bench/relay-bench.sh
/work/shared/bench/postfix-setup.sh >/dev/null 2>&1 || { echo "postfix setup failed" >&2; exit 1; }
postconf -e "milter_protocol = 6" "milter_default_action = tempfail" \
  "smtpd_milters = inet:127.0.0.1:$DKIM_PORT" >/dev/null
postfix reload >/dev/null 2>&1
sleep 2
master_pid() { tr -d ' ' </var/spool/postfix/pid/master.pid; }
summ() {
  awk '/^accepted_per_s/ { for (i=1;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       /^# / { for (i=2;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       END { printf "%s %s %s %s %s\n", v["accepted_per_s"], v["delivered_per_s"], v["drain_s"], v["peak_rss_kb"], v["peak_pss_kb"] }'
}
extra=$(printf '\n[[dkim]]\ndomain = "bench-client.localdomain"\nselector = "rsa"\nkey = "%s"\n' "$work/rsa.pem")
for run in $(seq "$RUNS"); do
  out=$("$H" -Q 'test -z "$(postqueue -j)"' -w "$(master_pid)" 127.0.0.1:2525 2626 4096 50 "$COUNT" 2>&1)
  echo "postfix+opendkim $(summ <<<"$out") load=$(cut -d' ' -f1 /proc/loadavg)"
  sleep 3
  out=$(EXTRA_CONF="$extra" PORT=2527 bench/relay.sh 4096 50 "$COUNT" 1 -e "$COUNT" 2>&1)
  echo "postern+rsa $(summ <<<"$out") load=$(cut -d' ' -f1 /proc/loadavg)"
  sleep 3
done
