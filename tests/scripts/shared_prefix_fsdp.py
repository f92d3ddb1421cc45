"""Run under torchrun (gloo, CPU, 2 ranks): shared-prefix training under FSDP2 (see
tests/test_shared_prefix.py). Rank 0's rows hold images, rank 1's are text-only. For an RL update
(`policy_update`) and an SFT-shaped supervised step (`supervised_update`), the weights after the
step with shared prefixes and with sharing off; which path each rank took; and a micro-batch that
one rank cannot share. Writes the results to argv[1] (rank 0)."""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: the row builders
import axpo.update as up  # noqa: E402
from axpo import distributed  # noqa: E402
from axpo.agent.format import AgentFormat  # noqa: E402
from axpo.agent.trajectory import Trajectory  # noqa: E402
from axpo.distributed import full_state_dict  # noqa: E402
from axpo.models import TinyModelConfig, load_model_and_processor  # noqa: E402
from axpo.policy import PolicyModel, pack  # noqa: E402
from axpo.rows import TrainingRow  # noqa: E402
from axpo.sft import encode_demo  # noqa: E402
from test_shared_prefix import TOOLS, _demo, _image, image_groups  # noqa: E402

out = sys.argv[1]
d = distributed.init()
torch.manual_seed(0)
tiny = TinyModelConfig(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
base, proc = load_model_and_processor("tiny", seed=0, tiny=tiny)
fmt = AgentFormat(proc)


def text_groups(n_groups=2, per_group=3):
    g = torch.Generator().manual_seed(5)
    trajs = []
    for q in range(n_groups):
        ch = fmt.prompt(f"{q + 3} times 7?", [], TOOLS)
        P = len(ch.ids)
        for k in range(per_group):
            n = int(torch.randint(2, 12, (1,), generator=g))
            toks = list(ch.ids) + torch.randint(10, 500, (n,), generator=g).tolist()
            trajs.append(Trajectory(uid=f"x{q}_{k}", sample_uid=f"x{q}", group=q, prompt_len=P, tokens=toks,
                                    loss_mask=[0] * P + [1] * n, logprobs=[0.0] * len(toks),
                                    entropies=[0.0] * len(toks)))
    return trajs


trajs = image_groups(fmt) if d.rank == 0 else text_groups()
adv = [float(i % 3) - 1.0 for i in range(len(trajs))]
if d.rank == 0:
    demos = [(*_demo(f"cell {i}?", f"\\boxed{{{i}}}", TOOLS, _image(i)), TOOLS) for i in range(3)]
else:
    demos = [(*_demo(f"{i} plus 2?", f"\\boxed{{{i + 2}}}", TOOLS), TOOLS) for i in range(3)]
enc = [encode_demo(m, im, fmt, t) for m, im, t in demos]
demo_rows = [TrainingRow.of_demo(e) for e in enc]

real_shared_prefix = up.shared_prefix
calls = []


def counted(*a, **k):
    k["min_saved"] = 0   # tiny rows: share whatever can be shared
    sp = real_shared_prefix(*a, **k)
    return sp


def layout(*a, **k):
    sp = orig_layout(*a, **k)
    calls.append(sp is not None)
    return sp


orig_layout = up.shared_layout
up.shared_layout = layout


def step(kind: str, share: bool) -> dict:
    up.shared_prefix = counted if share else (lambda *a, **k: None)
    policy = distributed.shard(PolicyModel(copy.deepcopy(base)), d, activation_checkpointing=False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    if kind == "update":
        masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
        tok_adv = [torch.full((len(t.tokens),), a) for t, a in zip(trajs, adv)]
        up.policy_update(policy, opt, trajs, tok_adv, masks, fmt=fmt, d=d, budget=100_000, temperature=1.0,
                         clip_low=0.2, clip_high=0.28, beta=0.0, agg="token-mean", epochs=1, grad_clip=1e9)
    else:
        up.supervised_update(policy, opt, demo_rows, [e.loss_mask for e in enc], fmt=fmt, d=d, budget=100_000,
                             grad_clip=1e9)
    return full_state_dict(policy)


init = {k: v.detach().clone() for k, v in base.state_dict().items()}
res = {}
shared_calls = []
for kind in ("update", "supervised"):
    calls.clear()
    a = step(kind, True)
    shared_calls += calls
    b = step(kind, False)
    keys = [k for k in a if k in b]
    res[f"max_diff_{kind}"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)
    res[f"changed_{kind}"] = any(not torch.equal(a[k], init[k]) for k in keys if k in init)

# One rank's micro-batch cannot share (its rows name no group): both ranks take the one-stage path.
calls.clear()
up.shared_prefix = counted
rows = up._rows(trajs) if d.rank == 0 else [TrainingRow(list(t.tokens)) for t in trajs]
idx = list(range(len(rows)))
L = pack(rows, fmt.pad, fmt.image_pad, idx).input_ids.shape[1]
masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
up.shared_layout(rows, idx, up.kept_positions(masks, idx, L, "cpu"), L, fmt, d, "cpu")
mixed = list(calls)

gathered = distributed.all_gather_objects({"shared": shared_calls, "mixed": mixed}, d)
if d.main:
    res["shared_calls"] = [g["shared"] for g in gathered]
    res["mixed_calls"] = [g["mixed"] for g in gathered]
    json.dump(res, open(out, "w"))
distributed.close()
