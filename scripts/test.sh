#!/usr/bin/env bash
# Set up (if needed) and run the fast test suite. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m slow` for the long toy-world alignment checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
