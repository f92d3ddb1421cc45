"""Run under torchrun (gloo, CPU): a few optimiser steps of the tiny policy under one precision
setup, then write the share of weights that changed to argv[2] (rank 0).

argv[1]: "fp32" (fp32 weights and compute), "bf16-master" (fp32 master weights, FSDP2 bf16 compute,
fp32 gradient reduction: distributed.shard(param_dtype=bf16)), or "bf16-pure" (bf16 weights and
optimizer state: what the trainer did before for model.dtype=bfloat16)."""

import json
import sys

import torch

from axpo import distributed
from axpo.distributed import full_state_dict
from axpo.models import TinyModelConfig, load_model_and_processor
from axpo.policy import PolicyModel, pack

mode, out = sys.argv[1], sys.argv[2]
d = distributed.init()
tiny = TinyModelConfig(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
model, proc = load_model_and_processor("tiny", seed=0, tiny=tiny,
                                       dtype=torch.bfloat16 if mode == "bf16-pure" else torch.float32)
before = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
policy = distributed.shard(PolicyModel(model), d, activation_checkpointing=False,
                           param_dtype=torch.bfloat16 if mode == "bf16-master" else None)
seen = set()
policy.hf.model.language_model.layers[0].register_forward_hook(
    lambda m, a, o: seen.add(str((o[0] if isinstance(o, tuple) else o).dtype)))
opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95), foreach=False)
g = torch.Generator().manual_seed(d.rank)
pad = proc.tokenizer.pad_token_id
for step in range(4):
    seqs = [{"tokens": torch.randint(10, 400, (24,), generator=g).tolist(), "pixel_values": [], "grids": []}
            for _ in range(2)]
    batch = pack(seqs, pad, proc.tokenizer.convert_tokens_to_ids("<|image_pad|>"), [0, 1])
    logp, _ = policy(batch, return_entropy=False)
    loss = -logp.float().mean()
    (loss * d.world).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
after = full_state_dict(policy)
if d.main:
    changed = sum(int((after[k].float() != before[k]).sum()) for k in before if k in after)
    total = sum(before[k].numel() for k in before if k in after)
    master = {str(p.dtype) for p in policy.parameters()}
    json.dump({"changed": changed / total, "param_dtypes": sorted(master), "compute_dtypes": sorted(seen)}, open(out, "w"))
distributed.close()
