#!/usr/bin/env bash
# Set up (if needed) and run the embedded default: Diffusion-DPO on the toy world.
# Extra arguments are config overrides, e.g. `scripts/demo.sh train.steps=50`.
# A rerun starts anew: the previous runs/demo is moved to runs/demo.replaced-<time> (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/mmalign train configs/toy/diffusion_dpo.yaml "$@" --output-dir runs/demo --overwrite --report
