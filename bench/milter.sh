#!/usr/bin/env bash
# bench/milter.sh - Postern and Postfix with the same milters, same sitting, same harness
# (issue 11): 4 KB x 50 sessions through no milter, a no-op libmilter milter in Python
# (testdata/milter/noop.py: pymilter, every stage asked, continue to each, accept at the
# end), the same in C (testdata/milter/noop.c on libmilter, compiled here: continue to
# every stage, end of message too) and clamav-milter + clamd (a one-signature database
# written here, no download).
# Prints one line per run:
#   relay milter accepted/s delivered/s drain_s peak_rss_kb peak_pss_kb \
#         busy_cpu_s harness_cpu_s milter_cpu_s clamd_cpu_s relay_cpu_s postern_cpu_s
# busy_cpu_s: the whole machine's busy CPU over the run (relay-bench.sh's cpu_busy_s);
# harness_cpu_s: smtp-source + smtp-sink; milter_cpu_s / clamd_cpu_s: utime+stime of the
# milter process (clamav-milter, noop-c, python) and of clamd over the run, from
# /proc/PID/stat (0 when not in use); relay_cpu_s = busy - harness - milter - clamd (the
# relay and whatever else ran); postern_cpu_s: Postern's own process, measured directly
# (bench/relay.sh; "na" for Postfix).
# Needs root (Postfix setup), postfix, gcc, libmilter-dev, python3-milter, clamav-daemon,
# clamav-milter. RUNS (default 3), COUNT (default 5000), MILTERS="none noop noop-c clamav"
# choose what runs; a milter written NAME:nopool runs Postern only, with pool_size = 0
# (a new milter connection per SMTP session, as before connections were kept);
# noop-c-unix is noop-c on a Unix socket, Postern only.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-5000}
MILTERS=${MILTERS:-none noop noop-c clamav}
cargo build --release -q -p postern || exit 1
BIN=$(mktemp -d)/postern
cp target/release/postern "$BIN"
export BIN
H=/work/shared/bench/relay-bench.sh
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  postconf -X smtpd_milters milter_protocol milter_default_action >/dev/null 2>&1
  postfix stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

ticks() { local st; read -ra st 2>/dev/null <"/proc/$1/stat" || { echo 0; return; }; echo $((st[13] + st[14])); }

# The no-op milters: pymilter, and C on libmilter.
NOOP_PORT=${NOOP_PORT:-2701}
/usr/bin/python3 testdata/milter/noop.py "$NOOP_PORT" >/dev/null 2>&1 &
noop_pid=$!
pids+=($!)
wait_port "$NOOP_PORT" || { echo "noop milter did not start" >&2; exit 1; }
NOOPC_PORT=${NOOPC_PORT:-2703}
POSTERN_PORT=${POSTERN_PORT:-2527}
gcc -O2 -Wall -o "$work/noop-c" testdata/milter/noop.c -lmilter -lpthread || exit 1
"$work/noop-c" "$NOOPC_PORT" >/dev/null 2>&1 &
noopc_pid=$!
pids+=($!)
wait_port "$NOOPC_PORT" || { echo "noop-c milter did not start" >&2; exit 1; }
# The same on a Unix socket, for Postern only (Postfix's smtpd runs chrooted).
"$work/noop-c" "unix:$work/noop-c.sock" >/dev/null 2>&1 &
noopcu_pid=$!
pids+=($!)
for _ in $(seq 200); do [[ -S $work/noop-c.sock ]] && break; sleep 0.05; done

# clamd + clamav-milter on TCP (Postfix's smtpd and Postern both reach it).
CLAM_PORT=${CLAM_PORT:-2702}
if [[ " $MILTERS " == *" clamav "* ]]; then
  mkdir -p "$work/db"
  eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
  printf 'Bench.EICAR:0:*:%s\n' "$(printf '%s' "$eicar" | od -An -tx1 | tr -d ' \n')" >"$work/db/bench.ndb"
  cat >"$work/clamd.conf" <<EOF
Foreground yes
LocalSocket $work/clamd.sock
DatabaseDirectory $work/db
PidFile $work/clamd.pid
User root
MaxThreads 20
EOF
  cat >"$work/clamav-milter.conf" <<EOF
Foreground yes
MilterSocket inet:$CLAM_PORT@127.0.0.1
ClamdSocket unix:$work/clamd.sock
User root
PidFile $work/milter.pid
OnInfected Reject
OnFail Defer
AddHeader Replace
MaxThreads 50
EOF
  clamd -c "$work/clamd.conf" >/dev/null 2>&1 &
  clamd_pid=$!
  pids+=($!)
  for _ in $(seq 200); do [[ -S $work/clamd.sock ]] && break; sleep 0.05; done
  clamav-milter -c "$work/clamav-milter.conf" >/dev/null 2>&1 &
  clamav_pid=$!
  pids+=($!)
  wait_port "$CLAM_PORT" || { echo "clamav-milter did not start" >&2; exit 1; }
fi

/work/shared/bench/postfix-setup.sh >/dev/null 2>&1 || { echo "postfix setup failed" >&2; exit 1; }
postconf -e "milter_protocol = 6" "milter_default_action = tempfail" >/dev/null
master_pid() { tr -d ' ' </var/spool/postfix/pid/master.pid; }
summ() {
  awk '/^accepted_per_s/ { for (i=1;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       /^# / { for (i=2;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       END { printf "%s %s %s %s %s\n", v["accepted_per_s"], v["delivered_per_s"], v["drain_s"], v["peak_rss_kb"], v["peak_pss_kb"] }'
}
address() {
  case $1 in
    noop) echo "127.0.0.1:$NOOP_PORT" ;;
    noop-c) echo "127.0.0.1:$NOOPC_PORT" ;;
    noop-c-unix) echo "unix:$work/noop-c.sock" ;;
    clamav) echo "127.0.0.1:$CLAM_PORT" ;;
  esac
}
milter_pid() {
  case ${1%:nopool} in
    noop) echo "$noop_pid" ;;
    noop-c) echo "$noopc_pid" ;;
    noop-c-unix) echo "$noopcu_pid" ;;
    clamav) echo "$clamav_pid" ;;
    *) echo 0 ;;
  esac
}
hz=$(getconf CLK_TCK)
# One measured run: $1 relay, $2 milter, the rest the command; prints the result line.
measure() {
  local relay=$1 m=$2 mp cp m0 c0 out
  shift 2
  mp=$(milter_pid "$m")
  cp=0
  [[ ${m%:nopool} == clamav ]] && cp=$clamd_pid
  m0=$(ticks "$mp") c0=$(ticks "$cp")
  out=$("$@" 2>&1)
  echo "$relay $m $(summ <<<"$out") $(awk -v m=$(( $(ticks "$mp") - m0 )) -v c=$(( $(ticks "$cp") - c0 )) -v hz="$hz" \
    -v busy="$(sed -n 's/.*cpu_busy_s=\([0-9.]*\).*/\1/p' <<<"$out")" \
    -v harness="$(sed -n 's/.*harness_cpu_s=\([0-9.]*\).*/\1/p' <<<"$out")" \
    -v own="$(sed -n 's/.*postern_cpu_s=\([0-9.]*\).*/\1/p' <<<"$out")" \
    'BEGIN { printf "%.1f %.1f %.2f %.2f %.1f %s\n", busy, harness, m / hz, c / hz, busy - harness - (m + c) / hz, own == "" ? "na" : own }')"
}
for run in $(seq "$RUNS"); do
  for spec in $MILTERS; do
    m=${spec%:nopool}
    pool=""
    [[ $spec == *:nopool ]] && pool=$'\npool_size = 0'
    if [[ $m == none ]]; then
      postconf -e "smtpd_milters =" >/dev/null
      extra=""
    elif [[ $m != *-unix ]]; then
      postconf -e "smtpd_milters = inet:$(address "$m")" >/dev/null
      extra=$'[[milter]]\nname = "'"$m"$'"\naddress = "'"$(address "$m")"'"'"$pool"
    else
      extra=$'[[milter]]\nname = "'"$m"$'"\naddress = "'"$(address "$m")"'"'"$pool"
    fi
    if [[ $spec == "$m" && $m != *-unix ]]; then
      postfix reload >/dev/null 2>&1
      sleep 2
      measure postfix "$m" "$H" -Q 'test -z "$(postqueue -j)"' -w "$(master_pid)" 127.0.0.1:2525 2626 4096 50 "$COUNT"
      sleep 3
    fi
    measure postern "$spec" env EXTRA_CONF="$extra" PORT="$POSTERN_PORT" bench/relay.sh 4096 50 "$COUNT"
    sleep 3
  done
done
