#!/usr/bin/env bash
# Lint and format check with ruff (settings in pyproject.toml: line length 120). Fix with
# `.venv/bin/ruff format . && .venv/bin/ruff check --fix .`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
