#!/usr/bin/env bash
# Two builds of the gateway against each other on the free route: both in front of the same nginx upstream,
# driven alternately by wrk (A B A B ...) with 64 connections. This is how a change's effect is measured on a
# noisy machine: the ratio within each pair, not the figures across runs.
#   bash bench/ab.sh path/to/old/x402-gateway path/to/new/x402-gateway [pairs=5] [seconds=5]
# Prints each run's req/s and CPU time per request (from /proc), then the medians of the ratios new/old.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

old_bin=$1
new_bin=$2
pairs=${3:-5}
seconds=${4:-5}

need nginx wrk python3
upstream_port=$(free_port)
start_upstream "$upstream_port"

start_gateway() { # binary name: sets $port and $pid (in this shell, so cleanup stops it)
  port=$(free_port)
  free_gateway_config "$port" "$upstream_port" >"$work/$2.toml"
  "$1" run --config "$work/$2.toml" 2>"$work/$2.log" &
  pid=$!
  pids+=("$pid")
  wait_port "$port"
}
start_gateway "$old_bin" old
old_port=$port old_pid=$pid
start_gateway "$new_bin" new
new_port=$port new_pid=$pid

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
ticks_per_second=$(getconf CLK_TCK)

measure() { # port pid → "req/s cpu_us_per_request"
  local before after out requests
  before=$(cpu_ticks "$2")
  out=$(wrk -t 2 -c 64 -d "${seconds}s" "http://127.0.0.1:$1/weather")
  after=$(cpu_ticks "$2")
  requests=$(awk '/requests in/ { print $1 }' <<<"$out")
  echo "$(awk '/^Requests\/sec/ { print $2 }' <<<"$out") $(awk -v t=$((after - before)) -v n="$requests" -v hz="$ticks_per_second" 'BEGIN { print t * 1e6 / hz / n }')"
}

wrk -t 2 -c 64 -d 2s "http://127.0.0.1:$old_port/weather" >/dev/null
wrk -t 2 -c 64 -d 2s "http://127.0.0.1:$new_port/weather" >/dev/null

printf '%-5s %-5s %12s %14s\n' pair build req/s cpu_us/req
: >"$work/pairs"
for pair in $(seq "$pairs"); do
  read -r o_rps o_cpu < <(measure "$old_port" "$old_pid")
  read -r n_rps n_cpu < <(measure "$new_port" "$new_pid")
  printf '%-5s %-5s %12s %14.2f\n%-5s %-5s %12s %14.2f\n' "$pair" old "$o_rps" "$o_cpu" "$pair" new "$n_rps" "$n_cpu"
  echo "$n_rps $o_rps $n_cpu $o_cpu" >>"$work/pairs"
done

rps_ratio=$(awk '{ print $1 / $2 }' "$work/pairs" | median)
cpu_ratio=$(awk '{ print $3 / $4 }' "$work/pairs" | median)
echo "median of $pairs paired ratios new/old: req/s ${rps_ratio}x, CPU per request ${cpu_ratio}x"
