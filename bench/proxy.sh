#!/usr/bin/env bash
# Free-route throughput and latency: the gateway against nginx as a reverse proxy, both in front of the same
# nginx upstream, driven alternately by wrk (A B A B ...) with 64 connections.
#   bash bench/proxy.sh [pairs=5] [seconds=10]
# Prints each run's req/s and p50/p99 latency, then the median of the per-pair ratios gateway/nginx.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pairs=${1:-5}
seconds=${2:-10}
connections=64
threads=2   # wrk threads; the gateway runs one tokio worker per core, nginx as many workers
cores=$(nproc)

need nginx wrk python3
build_release

upstream_port=$(free_port)
start_upstream "$upstream_port"

# The reference: nginx proxying with upstream keep-alive, as many workers as the gateway has threads.
nginx_port=$(free_port)
write_nginx_proxy "$work/proxy" "$nginx_port" "$upstream_port" "$cores"
nginx -p "$work/proxy" -c "$work/proxy/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_port "$nginx_port"

# The gateway: one free route to the same upstream; its access log goes to a file, as nginx's does.
gateway_port=$(free_port)
free_gateway_config "$gateway_port" "$upstream_port" >"$work/gateway.toml"
"$gateway_bin" run --config "$work/gateway.toml" 2>"$work/gateway.log" &
pids+=($!)
wait_port "$gateway_port"

# wrk prints latency percentiles in us/ms/s; normalise to milliseconds.
to_ms() { awk '{ v = $1; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } print v }'; }

measure() { # url → "req/s p50_ms p99_ms"
  local out
  out=$(wrk -t "$threads" -c "$connections" -d "${seconds}s" --latency "$1")
  local rps p50 p99
  rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
  p50=$(awk '$1 == "50%" { print $2 }' <<<"$out" | to_ms)
  p99=$(awk '$1 == "99%" { print $2 }' <<<"$out" | to_ms)
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers from $1" >&2; exit 1; fi
  echo "$rps $p50 $p99"
}

# Warm both (connection pools, page cache) before measuring.
wrk -t "$threads" -c "$connections" -d 2s "http://127.0.0.1:$gateway_port/weather" >/dev/null
wrk -t "$threads" -c "$connections" -d 2s "http://127.0.0.1:$nginx_port/weather" >/dev/null

printf '%-5s %-8s %12s %9s %9s\n' pair proxy req/s p50_ms p99_ms
: >"$work/ratios"
for pair in $(seq "$pairs"); do
  read -r g_rps g_p50 g_p99 < <(measure "http://127.0.0.1:$gateway_port/weather")
  read -r n_rps n_p50 n_p99 < <(measure "http://127.0.0.1:$nginx_port/weather")
  printf '%-5s %-8s %12s %9s %9s\n' "$pair" gateway "$g_rps" "$g_p50" "$g_p99" "$pair" nginx "$n_rps" "$n_p50" "$n_p99"
  echo "$g_rps $n_rps $g_p50 $n_p50 $g_p99 $n_p99" >>"$work/ratios"
done

rps_ratio=$(awk '{ print $1 / $2 }' "$work/ratios" | median)
p50_ratio=$(awk '{ print $3 / $4 }' "$work/ratios" | median)
p99_ratio=$(awk '{ print $5 / $6 }' "$work/ratios" | median)
echo "median of $pairs paired ratios gateway/nginx: req/s ${rps_ratio}x, p50 ${p50_ratio}x, p99 ${p99_ratio}x ($cores cores, $connections connections, ${seconds}s runs)"
