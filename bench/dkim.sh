#!/usr/bin/env bash
# bench/dkim.sh - the cost of DKIM signing (issue 10): 4 KB x 50 sessions through Postern
# without signing, with an RSA-2048 key and with an Ed25519 key ([[dkim]] for the
# harness's sender domain, bench-client.localdomain, so every message is signed), runs
# interleaved in one sitting. Prints "postern CASE accepted/s delivered/s drain_s
# peak_rss_kb peak_pss_kb" per run. RUNS (default 3), COUNT (default 10000).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-10000}
cargo build --release -q || exit 1
BIN=$(mktemp -d)/postern
cp target/release/postern "$BIN"
export BIN
keys=$(mktemp -d)
trap 'rm -rf "$keys"' EXIT
"$BIN" dkim keygen bench-client.localdomain rsa --out "$keys/rsa.pem" >/dev/null 2>&1
"$BIN" dkim keygen bench-client.localdomain ed --algorithm ed25519 --out "$keys/ed.pem" >/dev/null 2>&1
dkim() { printf '\n[[dkim]]\ndomain = "bench-client.localdomain"\nselector = "%s"\nkey = "%s"\n' "$1" "$2"; }
summ() {
  awk '/^accepted_per_s/ { for (i=1;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       /^# / { for (i=2;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       END { printf "%s %s %s %s %s\n", v["accepted_per_s"], v["delivered_per_s"], v["drain_s"], v["peak_rss_kb"], v["peak_pss_kb"] }'
}
for run in $(seq "$RUNS"); do
  for c in plain rsa ed25519; do
    case $c in
      plain) extra="" ;;
      rsa) extra=$(dkim rsa "$keys/rsa.pem") ;;
      ed25519) extra=$(dkim ed "$keys/ed.pem") ;;
    esac
    out=$(EXTRA_CONF="$extra" PORT=2527 bench/relay.sh 4096 50 "$COUNT" 1 -e "$COUNT" 2>&1)
    echo "postern $c $(summ <<<"$out") load=$(cut -d' ' -f1 /proc/loadavg)"
    sleep 3
  done
done
