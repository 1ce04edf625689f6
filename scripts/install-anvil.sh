#!/usr/bin/env bash
# Install anvil (Foundry's local Ethereum node) from the npm registry into the repo-local .tools/.
# Idempotent: does nothing if the pinned version is already installed.
# The last line of stdout is the absolute path of the anvil binary.
set -euo pipefail

ANVIL_VERSION=1.7.1
PKG=@foundry-rs/anvil-linux-amd64

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$root/.tools/anvil"
pkgdir="$prefix/node_modules/$PKG"
bin="$pkgdir/bin/anvil"

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "install-anvil.sh: only linux x86_64 is supported (got $(uname -s)-$(uname -m))" >&2
  exit 1
fi

installed=""
if [ -x "$bin" ] && [ -f "$pkgdir/package.json" ]; then
  installed="$(node -p "require('$pkgdir/package.json').version" 2>/dev/null || true)"
fi

if [ "$installed" != "$ANVIL_VERSION" ]; then
  echo "installing $PKG@$ANVIL_VERSION into $prefix" >&2
  mkdir -p "$prefix"
  npm install --silent --no-audit --no-fund --no-save --prefix "$prefix" "$PKG@$ANVIL_VERSION" >&2
  chmod +x "$bin"
fi

"$bin" --version >&2
echo "$bin"
