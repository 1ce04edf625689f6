# Shared by the benchmark scripts: tools, free ports, and the nginx upstream stand-in. Everything listens on
# 127.0.0.1 only.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/x402-bench.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# nginx with one worker answering every request with a small fixed JSON body: the upstream stand-in. Callers
# may add location blocks of their own.
start_upstream() { # port [locations]
  local port=$1 locations=${2:-} dir="$work/upstream"
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
error_log $dir/logs/error.log;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port;
    location / {
      default_type application/json;
      return 200 '{"city":"Lisbon","temperature_c":21.5,"wind_kmh":12}';
    }
$locations
  }
}
CONF
  nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
  pids+=($!)
  wait_port "$port"
}

# nginx as a reverse proxy in front of the upstream stand-in, with upstream keep-alive: the reference the gateway
# is measured against. Its access log goes to a file.
write_nginx_proxy() { # dir port upstream-port workers
  mkdir -p "$1/logs"
  cat >"$1/nginx.conf" <<CONF
worker_processes $4;
error_log $1/logs/error.log;
pid $1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log $1/logs/access.log;
  keepalive_requests 1000000;
  upstream api { server 127.0.0.1:$3; keepalive 128; }
  server {
    listen 127.0.0.1:$2;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
}

# A gateway configuration with one free catch-all route to the upstream stand-in; callers may append to it.
free_gateway_config() { # gateway-port upstream-port
  cat <<CONF
[server]
listen = "127.0.0.1:$1"
# The load comes from one address, 127.0.0.1: the per-address cap would hold it back.
max_connections_per_ip = 100000
[upstreams.api]
url = "http://127.0.0.1:$2"
[[routes]]
path = "/*"
upstream = "api"
CONF
}

# Builds the gateway (and the load driver) in release mode once, in $CARGO_TARGET_DIR when it is set.
build_release() {
  (cd "$repo" && cargo build --release --locked --bin x402-gateway --example paid_load >&2)
  local target=${CARGO_TARGET_DIR:-$repo/target}
  gateway_bin="$target/release/x402-gateway"
  driver_bin="$target/release/examples/paid_load"
}

median() {
  sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
