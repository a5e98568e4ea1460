#!/usr/bin/env bash
# bench/authentication.sh - the cost of the inbound checks (issue 10): 4 KB x 50
# sessions from a client that is neither trusted nor authenticated (trusted_networks = [],
# the harness's bench.test an accepted domain), without [authentication] and with SPF,
# DKIM and DMARC checks on, the records served by a local DNS responder
# (crates/postern-testkit's dns-responder): SPF "ip4:127.0.0.1 -all" and a DMARC p=reject
# record for the harness's sender domain, bench-client.localdomain. Each check case
# runs twice: with TTL 0 (every message looks every record up) and TTL 300 (the caches
# answer). Runs interleaved in one sitting. Prints "postern CASE accepted/s delivered/s
# drain_s peak_rss_kb peak_pss_kb load=" per run. RUNS (default 3), COUNT (default 10000).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-10000}
cargo build --release -q -p postern -p postern-testkit --bins || exit 1
BIN=$(mktemp -d)/postern
cp target/release/postern "$BIN"
export BIN
dns() { # TTL -> starts a responder, sets DNS_ADDR and DNS_PID
  coproc DNS { exec target/release/dns-responder --ttl "$1" \
    --txt 'bench-client.localdomain=v=spf1 ip4:127.0.0.1 -all' \
    --txt '_dmarc.bench-client.localdomain=v=DMARC1; p=reject; rua=mailto:d@bench.test'; }
  read -r DNS_ADDR <&"${DNS[0]}"
  DNS_PID=$DNS_PID
}
summ() {
  awk '/^accepted_per_s/ { for (i=1;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       /^# / { for (i=2;i<=NF;i++) { split($i,a,"="); v[a[1]]=a[2] } }
       END { printf "%s %s %s %s %s\n", v["accepted_per_s"], v["delivered_per_s"], v["drain_s"], v["peak_rss_kb"], v["peak_pss_kb"] }'
}
export ACCEPTED='["bench.test"]' TRUSTED='[]'
for run in $(seq "$RUNS"); do
  for c in plain checks-ttl0 checks-ttl300; do
    extra=""
    case $c in
      checks-ttl0) dns 0 ;;
      checks-ttl300) dns 300 ;;
    esac
    if [[ $c != plain ]]; then
      extra="dns_servers = [\"$DNS_ADDR\"]
[authentication]
spf = true
dkim = true
dmarc = true
dmarc_enforce = true
spf_reject = true"
    fi
    out=$(EXTRA_CONF="$extra" PORT=2527 bench/relay.sh 4096 50 "$COUNT" 1 -e "$COUNT" 2>&1)
    echo "postern $c $(summ <<<"$out") load=$(cut -d' ' -f1 /proc/loadavg)"
    if [[ $c != plain ]]; then kill "$DNS_PID" 2>/dev/null; wait "$DNS_PID" 2>/dev/null; fi
    sleep 3
  done
done
