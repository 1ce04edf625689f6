#!/usr/bin/env bash
# The gateway's resident memory: idle after start; with 1,000 keep-alive connections open, each having made
# one request through the gateway; and at its peak while wrk keeps 1,000 connections busy on a free route.
#   bash bench/memory.sh [connections=1000] [seconds=10]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

connections=${1:-1000}
seconds=${2:-10}

need nginx wrk python3
build_release

upstream_port=$(free_port)
start_upstream "$upstream_port"

# A free route and a paid one (its facilitator is a closed loopback port: only the code paths are loaded).
gateway_port=$(free_port)
free_gateway_config "$gateway_port" "$upstream_port" >"$work/gateway.toml"
cat >>"$work/gateway.toml" <<CONF
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "eip155:84532"
asset = "USDC"
facilitator = "http://127.0.0.1:9"
[ledger]
path = "$work/ledger.db"
[[routes]]
path = "/paid"
upstream = "api"
price = "\$0.001"
CONF
"$gateway_bin" run --config "$work/gateway.toml" 2>"$work/gateway.log" &
gateway=$!
pids+=("$gateway")
wait_port "$gateway_port"
sleep 2

rss_mb() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$gateway/status"; }
idle=$(rss_mb)

# Open keep-alive connections: each sends one request, reads the answer, and stays open until told to go.
python3 - "$gateway_port" "$connections" "$work/held" <<'PY' &
import os, socket, sys, time
port, count, flag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /weather HTTP/1.1\r\nHost: bench\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 10:
        answer += s.recv(65536)
    held.append(s)
open(flag, "w").close()
while os.path.exists(flag):
    time.sleep(0.1)
PY
holder=$!
while [ ! -e "$work/held" ]; do sleep 0.2; done
sleep 1
keepalive=$(rss_mb)
rm -f "$work/held"
wait "$holder"
sleep 1

wrk -t 2 -c "$connections" -d "${seconds}s" "http://127.0.0.1:$gateway_port/weather" >"$work/wrk.txt" &
load=$!
peak=$idle
while kill -0 "$load" 2>/dev/null; do
  now=$(rss_mb)
  peak=$(awk -v a="$peak" -v b="$now" 'BEGIN { print (b > a) ? b : a }')
  sleep 0.2
done
wait "$load"
open=$(ls "/proc/$gateway/fd" | wc -l)
requests=$(awk '/^Requests\/sec/ { print $2 }' "$work/wrk.txt")
after=$(rss_mb)
echo "idle RSS ${idle} MB; ${keepalive} MB with ${connections} open keep-alive connections; peak ${peak} MB with ${connections} busy connections (${requests} req/s), ${after} MB after; ${open} fds open at the end"
