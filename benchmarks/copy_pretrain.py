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
from copy_probe import batches, build, copy_accuracy, copy_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    net, proc, ids, digits = build("qwen3vl")
    make = {layout: batches(ids, digits, layout) for layout in ("fixed", "variable")}
    held_x, held_m = make["variable"](random.Random(999), 64)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95))
    rng, t0 = random.Random(0), time.time()
    for step in range(1, args.steps + 1):
        copy_step(net, opt, *make["fixed" if step % 2 else "variable"](rng, args.batch))
        if step % 250 == 0 or step == args.steps:
            acc = copy_accuracy(net, held_x, held_m)
            print(f"step {step}: content-based copy accuracy {acc:.3f}, {time.time() - t0:.0f} s", flush=True)
    net.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
