"""The built-in run's SFT step and RL update with and without shared-prefix training, under
torchrun (FSDP2, gloo).

    torchrun --nproc_per_node=2 benchmarks/bench_shared_prefix.py             # SFT, 6 alternating pairs
    torchrun --nproc_per_node=2 benchmarks/bench_shared_prefix.py --stage rl  # RL update

Work: the default config's model and data (`configs/default.yaml`: tiny Qwen3-VL on the three
built-in tasks), the real trainer's supervised step (`update.supervised_update`) on the SFT
demonstrations of consecutive steps (16 per step over the ranks), from the random base (the cost
of a step does not depend on the weights); with `--stage rl`, the RL update (`update.policy_update`)
on one step's rollouts (8 questions x 8, rolled out once per pair and updated on by both arms).
The two arms alternate step by step, `shared` (each
micro-batch's demonstrations with one system turn forward it once: `policy.shared_prefix`) and
`plain` (sharing off), so machine noise hits both alike. Reported: medians over pairs of the step's
wall time and its CPU time summed over ranks (steadier than wall time on a machine shared with
other jobs), the forwarded tokens per step, and the per-pair ratio shared / plain. Rows go to
benchmarks/results/bench_shared_prefix.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import axpo.update as up  # noqa: E402
from axpo import distributed  # noqa: E402
from axpo.algo.credit import assign  # noqa: E402
from axpo.config import load_config  # noqa: E402
from axpo.rows import TrainingRow  # noqa: E402
from axpo.trainer import Trainer, take  # noqa: E402

OUT_NAME = "bench_shared_prefix.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--stage", choices=["sft", "rl"], default="sft")
    ap.add_argument("--steps", type=int, default=6, help="alternating pairs (the first is warm-up)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out_dir = tempfile.mkdtemp(prefix="bench_shared_prefix_")
    cfg = load_config(args.config, ["pretrain.steps=0", "rl.steps=0", f"trainer.output_dir={out_dir}",
                                    "trainer.tensorboard=false", "trainer.plots=false"])
    tr = Trainer(cfg)
    stage = cfg.sft if args.stage == "sft" else cfg.rl
    tr._make_optimizer(stage)   # as the stage does
    if args.stage == "rl":
        tr.sync_engine()            # every rank's engine holds the policy's weights
    d = tr.d
    real = up.shared_prefix
    tokens = {"shared": [], "plain": []}
    seen = []

    def counted(*a, **k):
        sp = real(*a, **k)
        seen.append(sp.tokens if sp is not None else None)
        return sp

    times = {"shared": [], "plain": []}
    cpu = {"shared": [], "plain": []}
    for step in range(args.steps):
        if args.stage == "sft":
            idx = take(len(tr.src.demos), cfg.sft.questions_per_step, step, cfg.trainer.seed)[d.rank::d.world]
            enc = [tr._encoded_demo(i) for i in idx]
            rows = [TrainingRow.of_demo(e) for e in enc]
            lengths = [len(r) for r in rows]

            def work():
                tr._supervised_step(rows, [e.loss_mask for e in enc], cfg.sft.micro_batch_tokens)
        else:
            qs = take(len(tr.src.train), cfg.rl.questions_per_step, step, cfg.trainer.seed + 1)[d.rank::d.world]
            trajs = tr.loop.rollout([tr.src.train[i] for i in qs], cfg.rollout.group_size, step=step)
            reward = tr.src.reward_fn("train")
            for t in trajs:
                t.reward = reward(t)
            tr.loop.release(trajs)
            _, tok_adv, masks = assign(trajs, cfg.algo, [True] * len(trajs))
            lengths = [len(t.tokens) for t in trajs]
            a = cfg.algo

            def work():
                up.policy_update(tr.policy, tr.optimizer, trajs, tok_adv, masks, fmt=tr.fmt, d=d,
                                 budget=cfg.rl.micro_batch_tokens, temperature=cfg.rollout.temperature,
                                 clip_low=a.clip_low, clip_high=a.clip_high, beta=0.0, agg=a.loss_agg,
                                 epochs=a.ppo_epochs, grad_clip=cfg.optim.grad_clip)
        for arm in ("shared", "plain"):
            up.shared_prefix = counted if arm == "shared" else (lambda *a, **k: None)
            seen.clear()
            distributed.all_reduce_sum(0.0, d)   # both ranks start the step together
            t, c = time.perf_counter(), time.process_time()
            work()
            wall, used = time.perf_counter() - t, time.process_time() - c
            times[arm].append(distributed.all_reduce_max(int(wall * 1e6), d) / 1e6)
            cpu[arm].append(distributed.all_reduce_sum(used, d))
            # Forwarded tokens: the shared layout's where it was used, else the padded rows'.
            batches = up.micro_batches(lengths, stage.micro_batch_tokens)
            plain = [len(b) * max(lengths[i] for i in b) for b in batches]
            fwd = sum(s if s is not None else p for s, p in zip(seen, plain)) if arm == "shared" and seen \
                else sum(plain)
            tokens[arm].append(distributed.all_reduce_sum(float(fwd), d))
    up.shared_prefix = real
    if d.main:
        from common import RESULTS_DIR, append_row, env_info, timestamp

        pairs = range(1, args.steps)
        ratio = [times["shared"][i] / times["plain"][i] for i in pairs]
        cratio = [cpu["shared"][i] / cpu["plain"][i] for i in pairs]
        row = {"timestamp": timestamp(), **env_info(), "world": d.world, "config": args.config, "stage": args.stage,
               "pairs": len(ratio),
               "median_step_s": {a: statistics.median(times[a][1:]) for a in times},
               "median_step_cpu_s": {a: statistics.median(cpu[a][1:]) for a in cpu},
               "median_tokens": {a: statistics.median(tokens[a][1:]) for a in tokens},
               "ratio_per_pair": [round(x, 3) for x in ratio], "cpu_ratio_per_pair": [round(x, 3) for x in cratio],
               "median_ratio": statistics.median(ratio), "median_cpu_ratio": statistics.median(cratio)}
        for a in ("shared", "plain"):
            print(f"{a:7s} step {row['median_step_s'][a]:.3f} s wall, {row['median_step_cpu_s'][a]:.3f} s CPU "
                  f"(all ranks), {row['median_tokens'][a]:.0f} tokens forwarded")
        print(f"shared / plain: wall {row['median_ratio']:.3f} (pairs {row['ratio_per_pair']}), "
              f"CPU {row['median_cpu_ratio']:.3f} (pairs {row['cpu_ratio_per_pair']})")
        if not args.no_save:
            append_row(os.path.join(RESULTS_DIR, OUT_NAME), row)
    tr.close()


if __name__ == "__main__":
    main()
