#!/usr/bin/env bash
# Create .venv (if missing) and install mmalign with its test extra. Idempotent and quick
# when nothing changed (a stamp records the hash of pyproject.toml and setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mmalign-installed
want=$(cat pyproject.toml setup.py | sha256sum | cut -d" " -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # plain pip: on this machine a pip constraint keeps torch at the local 2.14.1 build
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
