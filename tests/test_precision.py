"""bf16 training keeps fp32 master weights (FSDP2 mixed precision), so small updates are not lost.

Under torchrun (gloo, 2 CPU processes), 4 AdamW steps at lr 1e-6 of the tiny policy: with bf16
compute over fp32 master weights the same share of weights changes as in fp32; with bf16 weights
and optimizer state (what `model.dtype: bfloat16` used to train with) almost none does, because
a bf16 weight cannot absorb an update 1e-6 of its size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "scripts" / "precision_steps.py"), mode, str(out)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_bf16_with_fp32_master_weights_trains_like_fp32(tmp_path):
    fp32, master, pure = (run(m, tmp_path) for m in ("fp32", "bf16-master", "bf16-pure"))
    assert fp32["compute_dtypes"] == ["torch.float32"]
    assert master["compute_dtypes"] == ["torch.bfloat16"] and master["param_dtypes"] == ["torch.float32"]
    assert pure["param_dtypes"] == ["torch.bfloat16"]
    assert fp32["changed"] > 0.2
    assert master["changed"] == pytest.approx(fp32["changed"], rel=0.02)
    assert pure["changed"] < 0.1 * fp32["changed"]


def test_mp_policy_computes_low_and_reduces_in_fp32():
    import torch

    from axpo.distributed import mp_policy

    assert mp_policy(torch.float32) is None and mp_policy(None) is None
    mp = mp_policy(torch.bfloat16)
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
