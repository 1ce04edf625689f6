#!/usr/bin/env bash
# Paid calls settled through the reference facilitator (tests/interop/facilitator.mjs: @x402/core
# x402Facilitator + @x402/evm, one signer) on a local chain, driven by the paid-call load driver
# (examples/paid_load.rs: pre-signed EIP-3009 authorizations, one buyer per connection).
#   bash bench/remote.sh [calls=300] [concurrencies="1 16 64"]
# Runs, each on a fresh chain, facilitator and gateway: `settle = "after"` through one facilitator at each
# concurrency, then through two facilitators (two signers) at the highest. Prints calls/s (answered 200),
# latency percentiles, and how many calls were delivered (200) and settled on chain (the payee's balance).
# anvil mines a block every second besides each transaction's, as a real chain keeps mining: viem, in the
# facilitator, looks for a receipt it missed only on a new block.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

calls=${1:-300}
concurrencies=${2:-"1 16 64"}

need nginx python3
anvil_bin=$(bash "$repo/scripts/install-anvil.sh" | tail -n 1)
bash "$repo/scripts/install-interop.sh"
build_release

upstream_port=$(free_port)
start_upstream "$upstream_port"

# anvil's dev accounts #1 and #4 sign for the facilitators (#0 deploys and mints, #3 is the payee).
facilitator_keys=(
  0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d
  0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a
)

gateway_config() { # ledger-name port admin-port facilitator-lines
  cat <<CONF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
[upstreams.api]
url = "http://127.0.0.1:$upstream_port"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "eip155:84532"
asset = "USDC"
$4
# Every buyer of the benchmark pays from 127.0.0.1: the per-address attempt limit would cap the run.
attempt_rate_per_ip = 1000000
attempt_burst_per_ip = 1000000
[ledger]
path = "$work/$1.db"
[networks."eip155:84532"]
rpc_url = "$rpc"
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
CONF
}

start_facilitator() { # key port
  X402_BENCH_FACILITATOR_KEY=$1 node "$repo/tests/interop/facilitator.mjs" --rpc "$rpc" \
    --key-env X402_BENCH_FACILITATOR_KEY --port "$2" --block-time-ms 1000 >/dev/null 2>>"$work/facilitator.log" &
  pids+=($!)
  wait_port "$2"
}

run() { # label concurrency facilitators
  local label=$1 concurrency=$2 facilitators=$3
  local anvil_port port admin_port facilitator_port lines="facilitators = [" i
  anvil_port=$(free_port)
  "$anvil_bin" --host 127.0.0.1 --port "$anvil_port" --chain-id 84532 --mixed-mining --block-time 1 \
    >"$work/anvil.log" 2>&1 &
  local anvil=$!
  wait_port "$anvil_port"
  rpc="http://127.0.0.1:$anvil_port"
  eval "$("$driver_bin" deploy --rpc "$rpc")" # sets TESTUSDC (and MULTICALL, unused here)
  local started=${#pids[@]}
  for ((i = 0; i < facilitators; i++)); do
    facilitator_port=$(free_port)
    start_facilitator "${facilitator_keys[$i]}" "$facilitator_port"
    lines+="{ url = \"http://127.0.0.1:$facilitator_port\" }, "
  done
  lines+="]"
  port=$(free_port)
  admin_port=$(free_port)
  gateway_config remote "$port" "$admin_port" "$lines" >"$work/remote.toml"
  "$gateway_bin" run --config "$work/remote.toml" 2>"$work/remote.log" &
  local gateway=$!
  wait_port "$port"
  "$driver_bin" run --url "http://127.0.0.1:$port/after" --rpc "$rpc" -n "$calls" -c "$concurrency" \
    --label "$label" | tee -a "$work/results.jsonl"
  # What the facilitators learned: their limits, retries and failovers.
  python3 - "http://127.0.0.1:$admin_port/readyz" "$label" <<'PY' | tee -a "$work/facilitators.txt"
import json, sys, urllib.error, urllib.request
try:
    ready = json.load(urllib.request.urlopen(sys.argv[1]))
except urllib.error.HTTPError as unready:
    ready = json.load(unready)
for f in ready["facilitators"]:
    print(f"{sys.argv[2]:32} {f['name']}: settle limit {f['settle_limit']}, verify limit {f['verify_limit']}, "
          f"retries {f['retries']}, failovers {f['failovers']}")
PY
  kill "$gateway" "$anvil" "${pids[@]:$started}" 2>/dev/null || true
  wait "$gateway" "$anvil" "${pids[@]:$started}" 2>/dev/null || true
  pids=("${pids[@]:0:$started}")
  rm -f "$work/remote.db"*
}

highest=1
for concurrency in $concurrencies; do
  run "one facilitator, $concurrency buyers" "$concurrency" 1
  highest=$concurrency
done
run "two facilitators, $highest buyers" "$highest" 2

python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n{'run':32} {'calls':>6} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>8} {'delivered':>9} {'on chain':>8}")
for r in rows:
    print(f"{r['label']:32} {r['calls']:6} {r['calls_per_sec']:8.0f} {r['p50_ms']:7.1f} {r['p99_ms']:8.1f} "
          f"{r['ok']:9} {r.get('settled_on_chain', '-'):>8}")
PY
echo
cat "$work/facilitators.txt"
