"""Exploration: pre-train the built-in tiny Qwen3-VL on synthetic copy sequences and save it as a
Hugging Face folder, to start the built-in run from a base that can copy.

Half the steps use fixed-offset copies, half content-based ones (see copy_probe.py). Then:

    python benchmarks/copy_pretrain.py --steps 1500 --out runs/tinycopy
    torchrun --nproc_per_node=2 axpo/train.py model.name=runs/tinycopy

Not yet part of the default run (a pre-training stage in the trainer is the next step).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from copy_probe import batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from axpo.models import build_tiny_model, build_tiny_processor

    torch.manual_seed(0)
    proc = build_tiny_processor()
    net = build_tiny_model(processor=proc)  # the same seed-0 model the built-in run starts from
    tok = proc.tokenizer
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    make = {layout: batches(ids, digits, layout) for layout in ("fixed", "variable")}
    held_x, held_m = make["variable"](random.Random(999), 64)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95))
    rng, t0 = random.Random(0), time.time()
    for step in range(1, args.steps + 1):
        x, m = make["fixed" if step % 2 else "variable"](rng, args.batch)
        logits = net(input_ids=x).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
        mask = m[:, 1:].float()
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == args.steps:
            with torch.no_grad():
                pred = net(input_ids=held_x).logits[:, :-1].argmax(-1)
            hit = held_m[:, 1:].bool()
            acc = ((pred == held_x[:, 1:]) & hit).sum().item() / hit.sum().item()
            print(f"step {step}: content-based copy accuracy {acc:.3f}, {time.time() - t0:.0f} s", flush=True)
    net.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
