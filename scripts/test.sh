#!/usr/bin/env bash
# Command 2 of the README: run the test suite on CPU with real vLLM.
#   bash scripts/test.sh            # everything (16 minutes on an idle 2-core machine)
#   bash scripts/test.sh -m "not slow" -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_TARGET_DEVICE=cpu
# model-info cache and compiled artefacts stay inside the run, never stale from another checkout
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$(mktemp -d -t vllm-internvl-cache.XXXXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
exec .venv/bin/python -m pytest "$@"
