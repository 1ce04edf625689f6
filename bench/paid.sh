#!/usr/bin/env bash
# Paid calls end to end on a local chain: the gateway settling in-process on anvil, driven by the paid-call
# load driver (examples/paid_load.rs) with N pre-signed authorizations from C concurrent buyers.
#   bash bench/paid.sh [calls=3000] [concurrency=64] [batch=50] [window_ms=20] [lone_calls=1000] [upto_calls=lone_calls]
# Runs, each on a fresh chain and gateway (anvil slows down as its history grows): the route free;
# settle = "after" and "before" with one transaction per payment; the same with batched settlement; `upto`
# (per-token, Permit2) chat calls answered in JSON and as an SSE stream, each settled by its usage in a
# transaction of its own. Prints paid calls/s, latency percentiles, how many settled on chain, transactions and
# gas per payment, each run's throughput as a ratio of the free route's, and the upto runs against exact's
# "after, one tx per payment". The upto runs need the interop packages (`npm ci --prefix tests/interop`) for
# Permit2's code.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

calls=${1:-3000}
concurrency=${2:-64}
batch=${3:-50}
window_ms=${4:-20}
# One transaction per payment means one anvil block per payment, and anvil slows down as blocks pile up:
# those runs send fewer calls.
lone_calls=${5:-1000}
# upto never batches: one transaction per payment too.
upto_calls=${6:-$lone_calls}

need nginx python3
anvil_bin=$(bash "$repo/scripts/install-anvil.sh" | tail -n 1)
build_release

upstream_port=$(free_port)
# The LLM answers of the upto routes, each with its usage (40 prompt, 30 completion tokens): in JSON, and as an
# SSE stream whose last event carries the usage.
upto_answers=$(cat <<'NGINX'
    location /upto-json {
      default_type application/json;
      return 200 '{"choices":[{"message":{"content":"hello paid world"}}],"usage":{"prompt_tokens":40,"completion_tokens":30}}';
    }
    location /upto-sse {
      default_type text/event-stream;
      return 200 'data: {"choices":[{"delta":{"content":"hello "}}]}\n\ndata: {"choices":[{"delta":{"content":"paid "}}]}\n\ndata: {"choices":[{"delta":{"content":"world"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":30}}\n\ndata: [DONE]\n\n';
    }
NGINX
)
start_upstream "$upstream_port" "$upto_answers"

# $1 and $2 per million input and output tokens: 1 and 2 atomic units of USDC per token.
upto_price='{ by = "body.model", per_token = { "bench" = { input = "$1/1M", output = "$2/1M" } }, max = "$0.50", default_max_tokens = 100 }'

# anvil's dev account #2 pays the settlement gas; #3 is the payee.
gateway_config() { # ledger-name port admin-port settlement-lines
  local port=$2 admin_port=$3
  cat <<CONF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin_port"
[upstreams.api]
url = "http://127.0.0.1:$upstream_port"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "eip155:84532"
asset = "USDC"
facilitator = "local"
# Every buyer of the benchmark pays from 127.0.0.1: the per-address attempt limit would cap the run.
attempt_rate_per_ip = 1000000
attempt_burst_per_ip = 1000000
$4
[ledger]
path = "$work/$1.db"
[networks."eip155:84532"]
rpc_url = "$rpc"
settler_key = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a"
multicall = "$MULTICALL"
[networks."eip155:84532".assets.USDC]
address = "$TESTUSDC"
decimals = 6
eip712_name = "USD Coin"
eip712_version = "2"
[[routes]]
path = "/after"
upstream = "api"
amount = "1000"
settle = "after"
[[routes]]
path = "/before"
upstream = "api"
amount = "1000"
settle = "before"
[[routes]]
path = "/free"
upstream = "api"
[[routes]]
path = "/upto-json"
upstream = "api"
methods = ["POST"]
price = $upto_price
[[routes]]
path = "/upto-sse"
upstream = "api"
methods = ["POST"]
price = $upto_price
CONF
}

run() { # label config-name settlement-lines path calls [--free]
  local label=$1 name=$2 lines=$3 path=$4 calls=$5
  shift 5
  local anvil_port port admin_port
  anvil_port=$(free_port)
  "$anvil_bin" --host 127.0.0.1 --port "$anvil_port" --chain-id 84532 >"$work/anvil.log" 2>&1 &
  local anvil=$!
  wait_port "$anvil_port"
  rpc="http://127.0.0.1:$anvil_port"
  eval "$("$driver_bin" deploy --rpc "$rpc")" # sets TESTUSDC and MULTICALL, places Permit2 and the upto proxy
  port=$(free_port)
  admin_port=$(free_port)
  gateway_config "$name" "$port" "$admin_port" "$lines" >"$work/$name.toml"
  "$gateway_bin" run --config "$work/$name.toml" 2>"$work/$name.log" &
  local gateway=$!
  wait_port "$port"
  "$driver_bin" run --url "http://127.0.0.1:$port$path" --rpc "$rpc" -n "$calls" -c "$concurrency" \
    --label "$label" "$@" | tee -a "$work/results.jsonl"
  # Where a call's time went, from the gateway's own histograms: mean milliseconds per stage.
  python3 - "http://127.0.0.1:$admin_port/metrics" "$label" <<'PY' | tee -a "$work/stages.txt"
import sys, urllib.request
sums = {}
for line in urllib.request.urlopen(sys.argv[1]).read().decode().splitlines():
    name, _, value = line.rpartition(" ")
    if name.endswith(("_latency_seconds_sum", "_latency_seconds_count")):
        sums[name.removeprefix("x402_gateway_")] = float(value)
stages = [s.removesuffix("_latency_seconds_count") for s in sums if s.endswith("_count")]
means = [f"{s} {1000 * sums[s + '_latency_seconds_sum'] / sums[s + '_latency_seconds_count']:.1f}"
         for s in stages if sums[s + "_latency_seconds_count"]]
print(f"{sys.argv[2]:28} mean ms per call: " + ", ".join(means))
PY
  kill "$gateway" "$anvil"
  wait "$gateway" "$anvil" 2>/dev/null || true
  # Warnings and errors are shown: a benchmark whose gateway complained is not one to quote. Not the ones
  # about paying anvil's dev account, which this configuration does on purpose.
  local complaints
  complaints=$(grep -E '^[^ ]+ +(WARN|ERROR) ' "$work/$name.log" | grep -v 'development mnemonic' || true)
  if [ -n "$complaints" ]; then
    echo "$label: the gateway logged $(wc -l <<<"$complaints") warnings or errors, the first ones:" >&2
    head -n 3 <<<"$complaints" >&2
  fi
  rm -f "$work/$name.db"*
}

batching="settle_batch_max = $batch
settle_batch_window_ms = $window_ms"
run "free route" lone "" /free "$calls" --free
run "after, one tx per payment" lone "" /after "$lone_calls"
run "before, one tx per payment" lone "" /before "$lone_calls"
run "after, batched" batched "$batching" /after "$calls"
run "before, batched" batched "$batching" /before "$calls"
run "upto JSON" lone "" /upto-json "$upto_calls" --scheme upto
run "upto SSE" lone "" /upto-sse "$upto_calls" --scheme upto --stream

python3 - "$work/results.jsonl" "$calls" "$concurrency" "$batch" "$window_ms" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
free = rows[0]["calls_per_sec"]
print(f"\n{sys.argv[3]} concurrent buyers; batches of up to {sys.argv[4]} payments within {sys.argv[5]} ms")
print(f"{'run':28} {'calls':>6} {'calls/s':>8} {'x free':>7} {'p50 ms':>7} {'p99 ms':>8} {'ok':>6} {'settled':>8} {'on chain':>8} {'txs':>6} {'gas/payment':>11} {'paid/payment':>12}")
for r in rows:
    print(f"{r['label']:28} {r['calls']:6} {r['calls_per_sec']:8.0f} {r['calls_per_sec'] / free:7.2f} {r['p50_ms']:7.1f} {r['p99_ms']:8.1f} "
          f"{r['ok']:6} {r.get('settled', '-'):>8} {r.get('settled_on_chain', '-'):>8} {r.get('transactions', '-'):>6} {r.get('gas_per_payment', '-'):>11} "
          f"{r.get('amount_per_payment', '-'):>12}")
exact = next(r for r in rows if r["label"] == "after, one tx per payment")
print(f"\nupto against exact's \"{exact['label']}\" (paid/payment in USDC's atomic units)")
for r in rows:
    if r["label"].startswith("upto"):
        print(f"{r['label']:28} calls/s {r['calls_per_sec'] / exact['calls_per_sec']:.2f}x, "
              f"gas per payment {r['gas_per_payment'] / max(exact['gas_per_payment'], 1):.2f}x")
PY
echo
cat "$work/stages.txt"
