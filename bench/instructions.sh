#!/usr/bin/env bash
# User-space instructions per free-route request, the gateway against nginx as a reverse proxy, both in front of
# the same nginx upstream, each run under valgrind's callgrind. Instruction counts do not depend on what else the
# machine is doing, so they compare builds (or the gateway and nginx) where wall-clock figures drown in noise.
# Kernel work is not counted: the gateway and nginx make the same system calls per request.
#   bash bench/instructions.sh [gateway binary, default: a release build of this tree] [seconds=10]
# Prints requests, instructions and instructions per request for each, where the gateway's go, and the ratio
# gateway/nginx.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds=${2:-10}
need nginx wrk python3 valgrind
if [ -n "${1:-}" ]; then gateway_bin=$1; else build_release; fi

upstream_port=$(free_port)
start_upstream "$upstream_port"

# Counts what a process serving on `port` executes while wrk drives it: zeroed after a warm-up, dumped after.
count() { # name port valgrind-pid → "requests instructions"
  local out="$work/$1.callgrind" requests
  for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$2/weather" && break; sleep 0.2; done
  wrk -t 1 -c 16 -d 3s "http://127.0.0.1:$2/weather" >/dev/null
  callgrind_control -z "$3" >/dev/null 2>&1
  requests=$(wrk -t 1 -c 16 -d "${seconds}s" "http://127.0.0.1:$2/weather" | awk '/requests in/ { print $1 }')
  callgrind_control -d "$3" >/dev/null 2>&1
  kill "$3"
  wait "$3" 2>/dev/null || true
  echo "$requests $(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')"
}

# nginx in one process (callgrind follows no forks), otherwise as bench/proxy.sh configures it.
nginx_port=$(free_port)
write_nginx_proxy "$work/proxy" "$nginx_port" "$upstream_port" 1
valgrind --tool=callgrind --callgrind-out-file="$work/nginx.callgrind" \
  nginx -p "$work/proxy" -c "$work/proxy/nginx.conf" -g 'daemon off; master_process off;' 2>/dev/null &
pids+=($!)
read -r n_requests n_instructions < <(count nginx "$nginx_port" $!)

gateway_port=$(free_port)
free_gateway_config "$gateway_port" "$upstream_port" >"$work/gateway.toml"
valgrind --tool=callgrind --callgrind-out-file="$work/gateway.callgrind" \
  "$gateway_bin" run --config "$work/gateway.toml" 2>/dev/null &
pids+=($!)
read -r g_requests g_instructions < <(count gateway "$gateway_port" $!)

printf '%-8s %10s %15s %12s\n' proxy requests instructions per_request
printf '%-8s %10s %15s %12s\n' gateway "$g_requests" "$g_instructions" $((g_instructions / g_requests)) \
  nginx "$n_requests" "$n_instructions" $((n_instructions / n_requests))
# Where the gateway's go, inclusive of what each part calls: hyper's client connection (the upstream side),
# hyper-util's server connection less the gateway's service in it, the service (routing, headers, log, metrics,
# the hand-off to the upstream connection), and the rest (the runtime, accepting).
part() { # function names, the first found → its inclusive instructions per request
  local name found
  for name in "$@"; do
    # awk leaving early stops callgrind_annotate with SIGPIPE: the pipeline's status says nothing here.
    found=$(callgrind_annotate --inclusive=yes --threshold=100 "$work/gateway.callgrind.1" 2>/dev/null |
      awk -v name="$name [" -v n="$g_requests" 'index($0, name) { gsub(",", "", $1); print int($1 / n); exit }' ||
      true)
    if [ -n "$found" ]; then
      echo "$found"
      return
    fi
  done
}
# Where inlining leaves them: each part under its own name, or the task it was inlined into.
client=$(part '<hyper::client::conn::http1::Connection<T,B> as core::future::future::Future>::poll' \
  'x402_gateway::proxy::pool::connect::{{closure}}::{{closure}}')
server=$(part '<hyper_util::server::conn::auto::Connection<I,S,E> as core::future::future::Future>::poll' \
  'x402_gateway::proxy::server::AcceptLoop<H>::run::{{closure}}::{{closure}}')
service=$(part 'x402_gateway::proxy::server::AcceptLoop::run::{{closure}}::{{closure}}::{{closure}}::{{closure}}' \
  'x402_gateway::proxy::server::AcceptLoop<H>::run::{{closure}}::{{closure}}::{{closure}}::{{closure}}')
if [ -n "$service" ]; then
  served="server connection less service $((${server:-0} - service)), service $service"
else
  served="server connection with the service ${server:-?} (the service is inlined into it)"
fi
echo "gateway per request: hyper client connection ${client:-?}, $served, rest $((g_instructions / g_requests - ${client:-0} - ${server:-0}))"
awk -v g=$((g_instructions / g_requests)) -v n=$((n_instructions / n_requests)) \
  'BEGIN { printf "user-space instructions per request, gateway/nginx: %.2fx\n", g / n }'
