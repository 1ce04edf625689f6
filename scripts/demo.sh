#!/usr/bin/env bash
# One complete paid call, offline: a local chain (anvil) with the repository's test USDC, the gateway settling
# in-process in front of the echo upstream, and `x402-gateway pay` as the buyer. It prints the 402, the receipt,
# the transaction and the ledger row, then stops everything it started.
#   bash scripts/demo.sh                      # builds with `cargo build --release` first
#   DEMO_PROFILE=debug bash scripts/demo.sh   # a debug build: quicker to build
#   X402_GATEWAY_BIN=... ECHO_UPSTREAM_BIN=... bash scripts/demo.sh   # binaries already built: no build
# Needs curl, and anvil (installed into .tools/ by scripts/install-anvil.sh, with npm), or ANVIL=/path/to/anvil.
# It uses anvil's development accounts, whose keys are public: right on this throw-away local chain only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# anvil's accounts #0 (deploys the token), #1 (the buyer), #2 (pays the gateway's gas), #3 (is paid).
deployer=0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
buyer=0x70997970C51812dc3A010C7d01b50e0d17dc79C8
buyer_key=0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d
settler_key=0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a
payee=0x90F79bf6EB2c4f870365E785982E1f101E93b906
chain_id=31337

say() { printf '\n== %s\n' "$*"; }
fail() { echo "demo: $*" >&2; exit 1; }

if [ -n "${X402_GATEWAY_BIN:-}" ] && [ -n "${ECHO_UPSTREAM_BIN:-}" ]; then
  gateway="$X402_GATEWAY_BIN"
  echo_upstream="$ECHO_UPSTREAM_BIN"
else
  profile="${DEMO_PROFILE:-release}"
  case "$profile" in
    release) build_flags=(--release) ;;
    debug) build_flags=() ;;
    *) fail "DEMO_PROFILE is release or debug, not $profile" ;;
  esac
  say "Building the gateway and the echo upstream ($profile)"
  "${CARGO:-cargo}" build "${build_flags[@]}" --bin x402-gateway --example echo_upstream
  target="${CARGO_TARGET_DIR:-$root/target}/$profile"
  gateway="$target/x402-gateway"
  echo_upstream="$target/examples/echo_upstream"
fi
anvil="${ANVIL:-$(bash scripts/install-anvil.sh | tail -n 1)}"

work="$(mktemp -d "${TMPDIR:-/tmp}/x402-demo.XXXXXX")"
started=()
# Stops what this script started, last first (by process id), and removes its files, however it ends.
cleanup() {
  local i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do
    kill "${started[i]}" 2>/dev/null || true
    wait "${started[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Prints the first line of file $1 matching the extended regex $2, waiting up to 30 s while process $3 lives.
wait_for() {
  local file=$1 pattern=$2 pid=$3 line _
  for _ in $(seq 300); do
    if line="$(grep -m 1 -E "$pattern" "$file")"; then
      printf '%s\n' "$line"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "demo: no line matching /$pattern/ from process $pid; its output:" >&2
  cat "$file" >&2
  return 1
}

# A JSON-RPC call to anvil: method $1, params $2 (JSON); prints the answer.
rpc() {
  local answer
  answer="$(curl -sS --max-time 10 -H 'content-type: application/json' \
    -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"$1\",\"params\":$2}" "$rpc_url")"
  case "$answer" in *'"error"'*) fail "$1: $answer" ;; esac
  printf '%s' "$answer"
}

# The string field $1 of the JSON object $2 (flat enough for the answers read here).
field() { printf '%s' "$2" | grep -o "\"$1\":\"[^\"]*\"" | head -n 1 | cut -d '"' -f 4; }

# An address as a 32-byte ABI word (hex, no 0x).
word() { local hex="${1#0x}"; printf '%064s' "${hex,,}" | tr ' ' 0; }

balance() {
  local answer hex
  answer="$(rpc eth_call "[{\"to\":\"$token\",\"data\":\"0x70a08231$(word "$1")\"},\"latest\"]")"
  hex="$(field result "$answer")"
  echo $((16#${hex#0x}))
}

say "Starting anvil (chain id $chain_id) on a free port"
"$anvil" --host 127.0.0.1 --port 0 --chain-id "$chain_id" >"$work/anvil.log" 2>&1 &
started+=($!)
rpc_url="http://$(wait_for "$work/anvil.log" '^Listening on ' "${started[-1]}" | sed 's/^Listening on //')"
echo "anvil: $rpc_url"

say "Deploying the test USDC (contracts/TestUSDC.sol) and minting 1 USDC to the buyer $buyer"
deployment="$(field result "$(rpc eth_sendTransaction "[{\"from\":\"$deployer\",\"data\":\"0x$(cat contracts/TestUSDC.bin)\"}]")")"
token="$(field contractAddress "$(rpc eth_getTransactionReceipt "[\"$deployment\"]")")"
[ -n "$token" ] || fail "the token was not deployed"
# mint(address,uint256) is 0x40c10f19; 1000000 is 1 USDC (6 decimals).
mint="0x40c10f19$(word "$buyer")$(printf '%064x' 1000000)"
rpc eth_sendTransaction "[{\"from\":\"$deployer\",\"to\":\"$token\",\"data\":\"$mint\"}]" >/dev/null
echo "token: $token; buyer's balance: $(balance "$buyer") (atomic units)"

say "Starting the echo upstream (examples/echo_upstream.rs)"
"$echo_upstream" 127.0.0.1:0 >"$work/echo.log" 2>&1 &
started+=($!)
echo_url="$(wait_for "$work/echo.log" '^echo upstream on ' "${started[-1]}" | sed 's/^echo upstream on //')"
echo "echo upstream: $echo_url"

say "Starting the gateway: /paid/* costs \$0.001, settled in-process on the local chain"
cat >"$work/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:0"

[upstreams.echo]
url = "$echo_url"

[payment]
pay_to = "$payee"
network = "eip155:$chain_id"
asset = "USDC"
facilitator = "local"

[networks."eip155:$chain_id"]
rpc_url = "$rpc_url"
settler_key = "\${DEMO_SETTLER_KEY}"

[networks."eip155:$chain_id".assets.USDC]
address = "$token"
decimals = 6
eip712_name = "USD Coin"
eip712_version = "2"

[ledger]
path = "$work/ledger.db"

[[routes]]
path = "/paid/*"
upstream = "echo"
strip_prefix = "/paid"
price = "\$0.001"
description = "Echo, paid per call"
EOF
DEMO_SETTLER_KEY="$settler_key" "$gateway" run --config "$work/gateway.toml" 2>"$work/gateway.log" &
started+=($!)
gateway_pid=${started[-1]}
address="$(wait_for "$work/gateway.log" 'listening addr=[^ ]+ kind="http"' "$gateway_pid" |
  sed 's/.*listening addr=\([^ ]*\) .*/\1/')"
url="http://$address/paid/hello"
cat "$work/gateway.log"

say "An unpaid call: 402, with the offer in the PAYMENT-REQUIRED header (x402 v2; the v1 body lists no offer, since v1 clients know no local chain)"
challenge="$(curl -sS -i --max-time 10 "$url")"
printf '%s\n' "$challenge"
echo
echo "PAYMENT-REQUIRED, decoded:"
printf '%s' "$challenge" | grep -i '^payment-required:' | cut -d ' ' -f 2 | tr -d '\r' | base64 -d
echo

say "Paying for it: x402-gateway pay (as the buyer)"
receipt="$(X402_BUYER_KEY="$buyer_key" "$gateway" pay "$url")" || {
  printf '%s\n' "$receipt"
  fail "the paid call did not succeed"
}
printf '%s\n' "$receipt"
transaction="$(printf '%s\n' "$receipt" | sed -n 's/^settled: transaction \(0x[0-9a-fA-F]*\).*/\1/p')"
[ -n "$transaction" ] || fail "no settlement transaction in the answer"

say "The transaction, on the local chain"
mined="$(rpc eth_getTransactionReceipt "[\"$transaction\"]")"
echo "transaction $transaction: status $(field status "$mined") (0x1 is success), block $(field blockNumber "$mined"),"
echo "  sent by the gateway's settler $(field from "$mined") to the token $(field to "$mined")"
echo "payee's balance: $(balance "$payee"), buyer's: $(balance "$buyer") (atomic units; 1000 is \$0.001)"

say "The ledger row: x402-gateway ledger list"
"$gateway" ledger list --config "$work/gateway.toml"

say "Stopping the gateway, the echo upstream and anvil"
kill -TERM "$gateway_pid"
wait "$gateway_pid" || fail "the gateway did not stop cleanly"
tail -n 1 "$work/gateway.log"
echo "done: one call paid, settled on chain and recorded, with nothing left running"
