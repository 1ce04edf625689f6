#!/usr/bin/env bash
# Install the official Python x402 SDK for the interop harness (tests/interop/pay.py) into a virtual
# environment in the repo-local .tools/python, from the exact pins of tests/interop/python/requirements.txt.
# Idempotent: skipped when the environment was installed from the same requirements by the same python3
# (a stamp file inside the environment records both).
# Prints nothing on stdout; pip's errors go to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/tests/interop/python/requirements.txt"
venv="$root/.tools/python"
stamp="$venv/.x402-installed"

if ! command -v python3 >/dev/null 2>&1; then
  echo "install-python.sh: python3 is required" >&2
  exit 1
fi

want="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >/dev/null
echo "$want" >"$stamp"
