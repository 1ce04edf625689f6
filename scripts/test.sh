#!/usr/bin/env bash
# The one command that runs every test: unit tests and the integration tests in tests/ (real sockets on
# 127.0.0.1, upstream servers written in the tests, payments signed with alloy signers).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
