#!/usr/bin/env bash
# The one command that runs every test: unit tests and the integration tests in tests/ (real sockets on
# 127.0.0.1, upstream servers written in the tests, payments signed with alloy signers, settled on a local
# anvil chain).
set -euo pipefail
cd "$(dirname "$0")/.."
# What the tests need besides cargo: a local chain (anvil) and the official x402 clients (Node, Python).
bash scripts/install-anvil.sh >/dev/null
bash scripts/install-interop.sh
bash scripts/install-python.sh
# Here a test that finds a tool missing fails instead of skipping as it does under a plain `cargo test`.
export X402_REQUIRE_TOOLS=1
cargo test --locked --workspace "$@"
