"""Process group and FSDP2 sharding.

Order of parallelisms: data parallel only (FSDP2 = ZeRO-3 style sharding over all ranks). Each
decoder layer and the vision encoder is one `fully_shard` unit; the root unit (embeddings, final
norm, LM head) is not resharded after forward, so the fused head uses the gathered LM-head weight
for the whole micro-batch. gloo on CPU; on GPU one process group with two backends, nccl for
CUDA tensors and gloo for CPU ones (object collectives, barriers), so a stray CPU tensor in a
collective still works instead of failing the first step. Scalar reductions build their tensors on
the rank's device anyway (NCCL alone has no CPU path).

Mixed precision: with `param_dtype` (bf16 or fp16) FSDP2 keeps fp32 master weights, gradients
reduced in fp32, and fp32 optimizer state; only the forward/backward compute is in low precision.

Works as a single process too (`python axpo/train.py`): then there is no process group and the
model is left unsharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init() -> Dist:
    device = torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:   # plain `python axpo/train.py`: no process group
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
        return Dist(device=device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def backend_for(device: torch.device) -> str:
    """gloo on CPU; on CUDA nccl for device tensors plus gloo for CPU tensors in the same group."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def close(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def mp_policy(param_dtype: torch.dtype | None):
    """FSDP2's mixed-precision policy: compute in `param_dtype`, reduce gradients in fp32. The
    sharded parameters (the optimizer's master weights) keep the dtype they were built in, which
    must be fp32 for low-precision training to work: at lr 1e-6 a bf16 weight (8 mantissa bits)
    absorbs almost no AdamW update."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None or param_dtype == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard(policy: nn.Module, d: Dist, *, mixed_precision: bool = False, activation_checkpointing: bool,
          param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2-shard a `PolicyModel` (see axpo/policy.py) in place and return it.

    `param_dtype`: the compute dtype under FSDP2 mixed precision (master weights stay in the
    model's dtype, fp32). `mixed_precision=True` is the older spelling of bf16 compute on GPU."""
    if param_dtype is None and mixed_precision and d.device.type == "cuda":
        param_dtype = torch.bfloat16
    hf = policy.hf
    layers = hf.model.language_model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if not d.enabled:
        return policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    kw = {"mesh": mesh}
    mp = mp_policy(param_dtype)
    if mp is not None:
        if any(p.dtype != torch.float32 for p in policy.parameters() if p.is_floating_point()):
            raise ValueError(f"mixed precision ({param_dtype}) needs fp32 master weights; build the model "
                             "in float32 and let FSDP cast for compute")
        kw["mp_policy"] = mp
    units = fsdp_units(policy)
    for unit in units[:-1]:
        fully_shard(unit, **kw)
    policy.always_run_vision = getattr(hf.model, "visual", None) is not None
    fully_shard(policy, reshard_after_forward=False, **kw)
    return policy


def fsdp_units(policy: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in the order `shard` wraps them: each decoder layer, the vision tower, then
    the root (the policy: embeddings, final norm, LM head; not resharded after forward). The
    memory planner (axpo/memory_plan.py) sizes the same units."""
    hf = policy.hf
    units = list(hf.model.language_model.layers)
    if getattr(hf.model, "visual", None) is not None:
        units.append(hf.model.visual)
    return units + [policy]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gets the full (unsharded) weights: gather each DTensor first, then return plain
    tensors with the Hugging Face names (the `hf.` prefix and checkpoint-wrapper names removed).
    Used for the rollout engine's weight sync and for the Hugging Face export."""
    out = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        name = name.replace("_checkpoint_wrapped_module.", "")
        if name.startswith("hf."):
            name = name[3:]
        out[name] = value.detach()
    return out


def _scalar_tensor(values: list, dtype: torch.dtype, d: Dist) -> torch.Tensor:
    # On the rank's device: NCCL reduces only CUDA tensors (fp64 is fine there).
    return torch.tensor(values, dtype=dtype, device=d.device)


def all_reduce_mean(values: dict[str, float], d: Dist) -> dict[str, float]:
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = _scalar_tensor([float(values[k]) for k in keys], torch.float64, d)
    dist.all_reduce(t)
    return {k: v / d.world for k, v in zip(keys, t.tolist())}


def all_reduce_sum(x, d: Dist):
    """Sum a float, or each value of a dict of floats, over ranks (one collective either way)."""
    if isinstance(x, dict):
        if not d.enabled or not x:
            return dict(x)
        keys = sorted(x)
        t = _scalar_tensor([float(x[k]) for k in keys], torch.float64, d)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))
    if not d.enabled:
        return x
    t = _scalar_tensor([float(x)], torch.float64, d)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(x: int, d: Dist) -> int:
    if not d.enabled:
        return x
    t = _scalar_tensor([int(x)], torch.long, d)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def even_batches(batches: list[list[int]], d: Dist) -> list[tuple[list[int], bool]]:
    """FSDP all-gathers parameters inside every forward, so all ranks must run the same number of
    forwards. Ranks with fewer micro-batches repeat their last one as a dummy (flag False: its loss
    is multiplied by zero). Returns (indices, real) pairs."""
    n = all_reduce_max(len(batches), d)
    out = [(b, True) for b in batches]
    while len(out) < n:
        out.append((batches[-1] if batches else [], False))
    return out


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
