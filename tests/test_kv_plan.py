"""The rollout engine's memory plan (issue #19 items 1-2): the KV pool is sized from a byte budget,
max_kv_tokens only caps it, and the engine allocates exactly the planned pool (checked on the meta
device at Qwen3-VL-8B's size and on CPU with a small budget)."""

import pytest
import torch

from axpo.rollout import Engine, SamplingParams
from axpo.rollout.kv_cache import kv_bytes_per_token, kv_geometry, plan_kv_cache

# Qwen3-VL-8B's text tower (transformers' Qwen3VLConfig defaults are a different model: 32 layers,
# 32 KV heads): 36 layers, hidden 4096, 32 query heads, 8 KV heads, head_dim 128, bf16.
QWEN3VL_8B_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                       rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                        "mrope_section": [24, 20, 20], "mrope_interleaved": True})
GB = 10**9


def test_plan_for_qwen3vl_8b_fits_the_budget():
    geo = dict(num_layers=36, num_kv_heads=8, head_dim=128)
    bpt = kv_bytes_per_token(**geo, dtype=torch.bfloat16)
    assert bpt == 36 * 2 * 8 * 128 * 2 == 147_456                          # 147 KB per token
    assert 2_000_000 * bpt / GB == pytest.approx(294.9, abs=0.1)            # the config's 2M tokens: 295 GB
    # An 80 GB device with 80 GB free, 0.3 of it for the rollout engine's KV (pool + workspace).
    plan = plan_kv_cache(**geo, dtype=torch.bfloat16, block_size=16, max_kv_tokens=2_000_000,
                         memory_fraction=0.3, free_bytes=80 * GB)
    assert plan.budget_bytes == 24 * GB
    assert plan.workspace_bytes == int(0.1 * 24 * GB)
    assert plan.num_tokens == (24 * GB - plan.workspace_bytes) // (bpt * 16) * 16 == 146_480
    assert plan.pool_bytes + plan.workspace_bytes <= plan.budget_bytes
    assert plan.pool_bytes + bpt * 16 > plan.budget_bytes - plan.workspace_bytes   # whole blocks, no more
    assert not plan.capped and "does not fit" in plan.describe()
    # A 20 GB explicit budget holds ~122k tokens (136k without the workspace slice).
    plan = plan_kv_cache(**geo, dtype=torch.bfloat16, budget_bytes=20 * GB, max_kv_tokens=2_000_000)
    assert plan.num_tokens == int(18 * GB // (bpt * 16) * 16) == 122_064
    # max_kv_tokens is a cap, never an allocation.
    plan = plan_kv_cache(**geo, dtype=torch.bfloat16, budget_bytes=20 * GB, max_kv_tokens=50_000)
    assert plan.capped and plan.num_tokens == 50_000


def test_plan_errors_and_defaults():
    geo = dict(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    assert plan_kv_cache(**geo).source == "default cpu budget"
    with pytest.raises(ValueError, match="holds no block"):
        plan_kv_cache(**geo, budget_bytes=1000)
    with pytest.raises(ValueError, match="free memory of meta unknown"):
        plan_kv_cache(**geo, memory_fraction=0.5, device="meta")
    with pytest.raises(ValueError, match="memory_fraction"):
        plan_kv_cache(**geo, memory_fraction=1.5, free_bytes=GB)
    with pytest.raises(ValueError, match="workspace_bytes"):
        plan_kv_cache(**geo, budget_bytes=GB, workspace_bytes=GB)


def test_engine_on_meta_allocates_the_plan_not_max_kv_tokens():
    """Qwen3-VL-8B on the meta device (no memory touched): the engine's pool tensors are the
    plan's size, with the configured max_kv_tokens of 2,000,000 far above it."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(text_config=QWEN3VL_8B_TEXT, vision_config=dict(out_hidden_size=4096))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16)
    geo = kv_geometry(model)
    assert geo == dict(num_layers=36, num_kv_heads=8, head_dim=128)
    budget = 24 * GB
    eng = Engine(model, block_size=16, max_kv_tokens=2_000_000, kv_cache_bytes=budget)
    plan = eng.kv_plan
    assert eng.cache.k[0].device.type == "meta"
    assert eng.cache.nbytes == plan.pool_bytes == plan.num_tokens * 147_456
    assert eng.cache.nbytes + plan.workspace_bytes <= budget
    assert eng.stats["blocks_total"] == plan.num_blocks == 146_480 // 16
    assert eng.stats["kv_cache_tokens"] == 146_480


def test_engine_on_cpu_within_a_small_budget(tiny_model):
    budget = 1 << 20
    eng = Engine(tiny_model, block_size=16, max_kv_tokens=None, kv_cache_bytes=budget)
    plan = eng.kv_plan
    assert eng.cache.nbytes == plan.pool_bytes and eng.cache.nbytes + plan.workspace_bytes <= budget
    assert plan.num_tokens == (budget - budget // 10) // (plan.bytes_per_token * 16) * 16
    seqs = eng.fork(eng.add(list(range(5, 40))), 4)
    outs = eng.generate(seqs, SamplingParams(max_tokens=8, seed=0))
    assert all(len(o.token_ids) == 8 for o in outs)
    assert eng.stats["workspace_bytes"] <= plan.workspace_bytes
