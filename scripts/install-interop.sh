#!/usr/bin/env bash
# Install the interop harness's pinned npm packages (tests/interop/package-lock.json) into
# tests/interop/node_modules with `npm ci`.
# Idempotent: skipped when node_modules was installed from the same lock file by the same node
# major version (a stamp file inside node_modules records the lock's sha256).
# Prints nothing on stdout; npm's errors go to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/tests/interop"
lock="$dir/package-lock.json"
stamp="$dir/node_modules/.interop-installed"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-interop.sh: node and npm are required" >&2
  exit 1
fi
if [ ! -f "$lock" ]; then
  echo "install-interop.sh: missing $lock" >&2
  exit 1
fi

want="$(sha256sum "$lock" "$dir/package.json" | sha256sum | cut -d' ' -f1) node$(node -p 'process.versions.node.split(".")[0]')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# --ignore-scripts: nothing the harness uses needs an install script (the only ones in the tree
# are optional native accelerators of wallet-connector dependencies, with JS fallbacks).
npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
echo "$want" >"$stamp"
