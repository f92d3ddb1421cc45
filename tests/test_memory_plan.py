"""The per-rank memory plan (axpo/memory_plan.py) of Qwen3-VL-8B, from its published config sizes
on the meta device, through the same FSDP2 unit split as axpo.distributed.shard."""

import torch

from axpo.memory_plan import QWEN3_VL_8B, GiB, meta_model, plan_memory, shard_numel


def test_meta_model_has_the_published_parameter_count():
    m = meta_model(QWEN3_VL_8B)
    n = sum(p.numel() for p in m.parameters())
    assert all(p.device.type == "meta" for p in m.parameters())
    assert 8.70e9 < n < 8.80e9   # Qwen3-VL-8B: 8.77B parameters


def test_shard_numel_pads_dim0_to_the_world_size():
    assert shard_numel(torch.empty(10, 3, device="meta"), 8) == 2 * 3
    assert shard_numel(torch.empty(16, 3, device="meta"), 8) == 2 * 3
    assert shard_numel(torch.empty(3, device="meta"), 8) == 1


def test_sharded_terms_scale_with_the_world_size():
    kw = dict(device_gb=80, micro_batch_tokens=32768, kv_tokens=100_000)
    p1 = plan_memory(QWEN3_VL_8B, world=1, **kw)
    p8 = plan_memory(QWEN3_VL_8B, world=8, **kw)
    for k in ("master weights (fp32 shards)", "AdamW moments (2 x fp32 shards)"):
        assert 7.9 < p1.terms[k] / p8.terms[k] <= 8.0
    # One rank cannot hold the 8B model's fp32 weights, gradients and AdamW state (16 B/param).
    assert not p1.fits and p1.total > 130 * GiB
    # Frozen vision: its parameters get no gradient or optimizer state.
    assert p8.facts["trainable parameters"] < p8.facts["parameters"]
    assert p8.terms["rollout KV pool"] == 100_000 * 2 * 36 * 8 * 128 * 2


def test_the_8b_config_fits_an_80gb_gpu_at_world_8_and_not_at_world_2():
    from axpo.config import load_config
    from axpo.memory_plan import plan_for_config

    cfg = load_config(__import__("pathlib").Path(__file__).parents[1] / "configs" / "qwen3vl-8b-axpo.yaml",
                      check=False)
    p8 = plan_for_config(cfg, world=8, device_gb=79.6)     # an H100 80GB: 81,559 MiB
    assert p8.fits, p8.table()
    # The KV pool is planned from a share of the device, not the config's 2M-token cap (295 GB).
    assert p8.terms["rollout KV pool"] <= 0.25 * p8.device_bytes
    assert p8.facts["KV pool tokens"] < cfg.rollout.max_kv_tokens
    assert not plan_for_config(cfg, world=2, device_gb=79.6).fits


def test_memory_plan_command_prints_the_plan():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "axpo.memory_plan", "--world", "8", "--device-gb", "79.6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rollout KV pool" in r.stdout and "(fits)" in r.stdout
