"""Per-rank device memory plan of a run, computed before renting GPUs.

    python -m axpo.memory_plan --config configs/qwen3vl-8b-axpo.yaml --world 8 --device-gb 80

The model is built from its transformers config on the meta device (no weights, no download when
the config is given as a JSON file or is one of the published configs below), wrapped like the
trainer wraps it, and split into the same FSDP2 units as `axpo.distributed.shard`
(`fsdp_units`). Each unit's parameters are sharded along dim 0 over the ranks, padded to a multiple
of the world size as FSDP2 does. Terms:

- master weights: fp32 shards of every parameter (FSDP2 mixed precision computes in bf16 but keeps
  the sharded parameters, the optimizer's master copy, in the dtype they were built in);
- gradients and AdamW's two moments: fp32 shards of the trainable parameters;
- gathered compute weights: the root unit (embeddings, final norm, LM head; never resharded) plus
  the two largest other units (the one running and the one prefetched), in the compute dtype, and
  one unsharded fp32 gradient of the largest unit before its reduce-scatter;
- rollout engine: the built-in engine's full copy of the weights in the compute dtype, its KV pool
  and its decode workspace, sized by the engine's own `axpo.rollout.kv_cache.plan_kv_cache` from
  a share of the device;
- activations with activation checkpointing at the micro-batch token budget: each layer's saved
  input, one layer recomputed in full (q, k, v, attention output, gate/up/down), the fused LM head's
  logits workspace;
- a fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.

It is an estimate with the terms named, not a measurement: compare with `torch.cuda.max_memory_allocated`
on the first steps of a real run.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

GiB = 2**30

# Qwen3-VL-8B (Instruct and Thinking share the architecture): the sizes of its published
# config.json, so the plan needs no download.
QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "tie_word_embeddings": False,
    "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "vocab_size": 151936, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False},
    "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "num_position_embeddings": 2304,
                      "deepstack_visual_indexes": [8, 16, 24]},
}
PUBLISHED = {"Qwen/Qwen3-VL-8B-Thinking": QWEN3_VL_8B, "Qwen/Qwen3-VL-8B-Instruct": QWEN3_VL_8B}
RESERVE_BYTES = 4 * GiB        # CUDA context, NCCL buffers, allocator fragmentation
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def meta_model(config: dict):
    """The Qwen3-VL model of `config` on the meta device: shapes only."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(cfg)


def shard_numel(param: torch.Tensor, world: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 padded up to a multiple of the world size."""
    if param.dim() == 0:
        return 1
    rest = param.numel() // max(1, param.shape[0])
    return math.ceil(param.shape[0] / world) * rest


@dataclass
class Plan:
    world: int
    device_bytes: int
    terms: dict[str, int] = field(default_factory=dict)
    facts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def table(self) -> str:
        lines = [f"per-rank memory plan, world size {self.world}, device {self.device_bytes / GiB:.0f} GiB",
                 f"{'term':<40} {'GiB':>8}"]
        lines += [f"{k:<40} {v / GiB:>8.2f}" for k, v in self.terms.items()]
        lines.append(f"{'total':<40} {self.total / GiB:>8.2f}  ({'fits' if self.fits else 'DOES NOT FIT'})")
        lines += [f"  {k}: {v:,.0f}" if abs(v) >= 100 else f"  {k}: {v}" for k, v in self.facts.items()]
        return "\n".join(lines)


def plan_memory(model_config: dict, *, world: int, device_gb: float, micro_batch_tokens: int,
                compute_dtype: str = "bfloat16", freeze_vision: bool = True,
                activation_checkpointing: bool = True, kv_tokens: int | None = None,
                kv_fraction: float = 0.25, max_total_tokens: int = 16384,
                lm_head_workspace_mib: float = 1024) -> Plan:
    """The per-rank plan of one training process at `world` ranks (see the module docstring).

    The rollout engine's KV pool and decode workspace share `kv_fraction` of the device (the
    engine's `plan_kv_cache`); `kv_tokens` caps the pool."""
    from axpo import distributed
    from axpo.policy import PolicyModel

    model = meta_model(model_config)
    policy = PolicyModel(model)
    if freeze_vision and getattr(model.model, "visual", None) is not None:
        model.model.visual.requires_grad_(False)
    units = distributed.fsdp_units(policy)
    seen: set[int] = set()
    unit_numel, unit_shard, unit_train_shard = [], [], []
    for unit in units:
        full = shard = train = 0
        for p in unit.parameters():
            if id(p) in seen:      # the root unit owns only what the inner units do not
                continue
            seen.add(id(p))
            n = shard_numel(p, world)
            full += p.numel()
            shard += n
            train += n if p.requires_grad else 0
        unit_numel.append(full)
        unit_shard.append(shard)
        unit_train_shard.append(train)
    cb = DTYPE_BYTES[compute_dtype]
    text = model.config.text_config
    H, I, V, L = text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers
    q = text.num_attention_heads * text.head_dim
    kv = text.num_key_value_heads * text.head_dim
    n_params = sum(unit_numel)
    inner = sorted(unit_numel[:-1], reverse=True)
    plan = Plan(world=world, device_bytes=int(device_gb * GiB))
    t = plan.terms
    t["master weights (fp32 shards)"] = 4 * sum(unit_shard)
    t["gradients (fp32 shards)"] = 4 * sum(unit_train_shard)
    t["AdamW moments (2 x fp32 shards)"] = 8 * sum(unit_train_shard)
    t["gathered root unit (embed + head)"] = cb * unit_numel[-1]
    t["gathered layers (running + prefetch)"] = cb * sum(inner[:2])
    trainable_units = [n for n, tr in zip(unit_numel[:-1], unit_train_shard[:-1]) if tr > 0]
    t["unsharded grad before reduce-scatter"] = 4 * max(trainable_units, default=0)
    t["rollout engine weights (full copy)"] = cb * n_params
    # The engine's own planner (axpo/rollout/kv_cache.py): the pool holds whole blocks of the budget
    # left after the bounded decode workspace; `kv_tokens` (a token count) caps the pool.
    from axpo.rollout.kv_cache import plan_kv_cache

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype]
    kvp = plan_kv_cache(num_layers=L, num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim,
                       dtype=dtype, budget_bytes=int(kv_fraction * plan.device_bytes),
                       max_kv_tokens=kv_tokens)
    bpt = kvp.bytes_per_token
    kv_tokens = kvp.num_tokens
    t["rollout KV pool"] = kvp.pool_bytes
    t["decode workspace (bounded by the plan)"] = kvp.workspace_bytes
    T = micro_batch_tokens
    if activation_checkpointing:
        saved = L * T * H * cb
        layer = T * (2 * H + q + 2 * kv + q + 3 * I) * cb   # norm'd input, q,k,v, attn out, gate/up/act
    else:
        saved = 0
        layer = L * T * (2 * H + q + 2 * kv + q + 3 * I) * cb
    t["activations: saved layer inputs"] = saved
    t["activations: one layer recomputed"] = layer
    t["fused LM head workspace + hidden grad"] = int(lm_head_workspace_mib * 2**20) + T * H * 4
    t["reserve (context, NCCL, fragmentation)"] = RESERVE_BYTES
    plan.facts = {"parameters": n_params, "trainable parameters": sum(
        p.numel() for p in model.parameters() if p.requires_grad), "KV bytes per token": bpt,
        "KV pool tokens": kv_tokens, "trajectories at max length in the pool": kv_tokens // max(1, max_total_tokens),
        "micro-batch tokens": T, "FSDP units": len(units)}
    return plan


def plan_for_config(cfg, *, world: int, device_gb: float, model_config: dict | None = None,
                    kv_fraction: float = 0.25) -> Plan:
    """The plan of an `axpo.config.Config` (its model, micro-batches and rollout limits)."""
    if model_config is None:
        name = cfg.model.name
        if name in PUBLISHED:
            model_config = PUBLISHED[name]
        elif (Path(name) / "config.json").exists():
            model_config = json.loads((Path(name) / "config.json").read_text())
        else:
            raise ValueError(f"model.name={name!r}: give its config.json with --model-config (the plan "
                             f"downloads nothing; known without one: {', '.join(PUBLISHED)})")
    mb = max(cfg.sft.micro_batch_tokens, cfg.rl.micro_batch_tokens)
    return plan_memory(model_config, world=world, device_gb=device_gb, micro_batch_tokens=mb,
                       compute_dtype="bfloat16" if cfg.model.dtype != "float32" else "float32",
                       freeze_vision=cfg.model.freeze_vision,
                       activation_checkpointing=cfg.model.activation_checkpointing,
                       kv_tokens=cfg.rollout.max_kv_tokens, kv_fraction=kv_fraction,
                       max_total_tokens=cfg.rollout.max_total_tokens)


def main(argv=None) -> int:
    from axpo.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/qwen3vl-8b-axpo.yaml")
    ap.add_argument("--world", type=int, default=8, help="ranks (GPUs) the run is sharded over")
    ap.add_argument("--device-gb", type=float, default=80.0, help="memory of one GPU, GiB")
    ap.add_argument("--kv-fraction", type=float, default=0.25, help="share of the device for the KV pool")
    ap.add_argument("--model-config", help="a config.json of the model (else the published sizes)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides, check=False)   # the plan needs no data files
    mc = json.loads(Path(a.model_config).read_text()) if a.model_config else None
    plan = plan_for_config(cfg, world=a.world, device_gb=a.device_gb, model_config=mc, kv_fraction=a.kv_fraction)
    print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
