#!/usr/bin/env bash
# Rebuild contracts/NAME.bin and NAME.abi.json from each contracts/NAME.sol (TestUSDC, Multicall,
# x402UptoPermit2Proxy, which also gets NAME.runtime.bin).
# Needs node + npm (solc-js is pure JS/wasm; no native solc download).
set -euo pipefail

SOLC_VERSION=0.8.30

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/../.tools/solc-$SOLC_VERSION"   # .tools/ is gitignored

if [ ! -f "$tools/node_modules/solc/package.json" ] ||
   [ "$(node -p "require('$tools/node_modules/solc/package.json').version")" != "$SOLC_VERSION" ]; then
  mkdir -p "$tools"
  npm install --silent --no-audit --no-fund --prefix "$tools" "solc@$SOLC_VERSION" >&2
fi

SOLC_VERSION="$SOLC_VERSION" node "$here/compile.js" "$tools/node_modules"
