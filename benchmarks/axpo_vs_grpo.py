"""AXPO vs GRPO (and GRPO with AXPO's extra budget spent on full rollouts) on the built-in tasks.

From one SFT checkpoint, trains each method over several seeds with the real trainer
(`torchrun axpo/train.py`), evaluates each final policy (Pass@1, Pass@4, tool-use rate), and writes
`benchmarks/results/axpo_vs_grpo.md` plus PNG curves of tool-use rate and accuracy over steps.

    python benchmarks/axpo_vs_grpo.py --sft-run runs/default   # CPU: reuse the default run's SFT
    python benchmarks/axpo_vs_grpo.py --config configs/qwen3vl-8b-axpo.yaml --nproc 8   # a GPU node

Every run's folder stays under --work (metrics.jsonl, evals.json, plots) for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from axpo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "grpo": ["algo.axpo=false", "algo.brute_force=false"],
    "brute_force": ["algo.axpo=false", "algo.brute_force=true"],
    "axpo": ["algo.axpo=true", "algo.brute_force=false"],
}


def train(out: Path, config: str, nproc: int, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "axpo" / "train.py"), "--config", config, "--output-dir", str(out), *overrides]
    t = time.time()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}); see {log}")
    secs = time.time() - t
    (out / "wall_time_s").write_text(f"{secs:.1f}\n")  # so a re-run of the script reports it
    return secs


def rows(run: Path, stage: str) -> list[dict]:
    return [r for r in read_metrics(run) if r["stage"] == stage]


def mean_sd(xs: list[float]) -> str:
    """Mean ± sample std over the seeds that have the value (a seed whose policy never used a
    tool has no accuracy-with-tool); the count is shown when some seeds lack it."""
    n_all = len(xs)
    xs = [x for x in xs if x == x]  # drop NaN
    if not xs:
        return "n/a"
    if len(xs) < n_all:
        return mean_sd(xs) + f" (n={len(xs)})"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rl-steps", type=int, default=None, help="override rl.steps")
    ap.add_argument("--work", default=str(ROOT / "runs" / "axpo_vs_grpo"))
    ap.add_argument("--sft-run", default=None,
                    help="reuse the SFT stage of this run folder (same config), e.g. runs/default")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = list(args.extra) + ["trainer.plots=false"]
    if args.rl_steps is not None:
        common.append(f"rl.steps={args.rl_steps}")
    t0 = time.time()

    # 1. One SFT checkpoint shared by every method and seed.
    if args.sft_run:
        sft_dir = Path(args.sft_run)
        ckpts = sorted((sft_dir / "checkpoints").glob("step_sft_*"))
        if not ckpts:
            raise SystemExit(f"--sft-run {sft_dir}: no SFT checkpoint in {sft_dir / 'checkpoints'}")
        sft_ckpt = ckpts[-1]
    else:
        sft_dir = work / "sft"
        latest = sft_dir / "checkpoints" / "latest"
        if not latest.exists():
            train(sft_dir, args.config, args.nproc, common + ["rl.steps=0"])
        sft_ckpt = sft_dir / "checkpoints" / latest.read_text().strip()
    sft_eval = json.loads((sft_dir / "evals.json").read_text())["after_sft"]

    # 2. RL per method and seed.
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            run = work / f"{m}_s{seed}"
            if not (run / "evals.json").exists() or "after_rl" not in json.loads((run / "evals.json").read_text()):
                secs = train(run, args.config, args.nproc,
                             common + METHODS[m] + [f"trainer.init_from={sft_ckpt}", f"trainer.seed={seed}",
                                                    "sft.steps=0"])
                print(f"{m} seed {seed}: {secs / 60:.1f} min", flush=True)
            rl = rows(run, "rl")
            ev = json.loads((run / "evals.json").read_text())["after_rl"]
            results[m].append({
                "eval": ev, "rl": rl,
                "rollout_tokens": sum(r["rollout_tokens"] for r in rl),
                "extra_rollouts": sum(r["extra_rollouts"] for r in rl),
                "all_wrong_rate": statistics.mean(r["all_wrong_rate"] for r in rl),
                "trigger_rate": statistics.mean(r["trigger_rate"] for r in rl),
                "resample_success_rate": statistics.mean(r["resample_success_rate"] for r in rl),
                "tool_use_first": rl[0]["tool_use_rate"], "tool_use_last": rl[-1]["tool_use_rate"],
            })

    # 3. Table.
    n_seeds = len(args.seeds)
    timings = [work / f"{m}_s{seed}" / "wall_time_s" for seed in args.seeds for m in args.methods]
    if all(p.exists() for p in timings):
        total = sum(float(p.read_text()) for p in timings)
        rl_minutes = f"{total / 60:.0f} min for {len(timings)} runs ({total / 60 / len(timings):.1f} min each)"
    else:
        rl_minutes = f"{(time.time() - t0) / 60:.0f} min in this invocation (some runs were done before)"
    lines = [
        "# AXPO vs GRPO on the built-in tasks", "",
        f"Command: `python benchmarks/axpo_vs_grpo.py {' '.join(sys.argv[1:])}`  ",
        f"Config: `{Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config}`,"
        f" seeds {args.seeds}, {args.nproc} processes; SFT checkpoint `{sft_ckpt.relative_to(ROOT) if sft_ckpt.is_relative_to(ROOT) else sft_ckpt}`; "
        f"RL wall time {rl_minutes}.", "",
        f"Mean ± sample std over {n_seeds} seeds. Pass@k from the held-out built-in questions "
        "(unbiased estimator, n = trainer.eval_samples). Tool use during RL: first and last step "
        "(training rollouts). Rollout tokens: every token the policy sampled during RL, extra branches "
        "and extra rollouts included (a branch's frozen prefix is not counted).", "",
        "| method | Pass@1 | Pass@4 | eval tool-use | RL tool-use first -> last | all-wrong rate | "
        "trigger rate | resample success | extra rollouts | rollout tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| SFT (start) | {sft_eval.get('pass@1', float('nan')):.3f} | {sft_eval.get('pass@4', float('nan')):.3f} | "
        f"{sft_eval['tool_use_rate']:.3f} | | | | | | |",
    ]
    for m, rs in results.items():
        ev = lambda k: [r["eval"].get(k, float("nan")) for r in rs]  # noqa: E731
        col = lambda k: [r[k] for r in rs]  # noqa: E731
        lines.append(
            f"| {m} | {mean_sd(ev('pass@1'))} | {mean_sd(ev('pass@4'))} | {mean_sd(ev('tool_use_rate'))} | "
            f"{mean_sd(col('tool_use_first'))} -> {mean_sd(col('tool_use_last'))} | {mean_sd(col('all_wrong_rate'))} | "
            f"{mean_sd(col('trigger_rate'))} | {mean_sd(col('resample_success_rate'))} | "
            f"{mean_sd(col('extra_rollouts'))} | {mean_sd(col('rollout_tokens'))} |")
    for suffix, title in (("/pass@1", "Per task Pass@1"), ("/tool_use_rate", "Per task tool-use rate (eval)"),
                          ("/accuracy_with_tool", "Per task accuracy of tool-using rollouts (eval)")):
        per_task = sorted({k for rs in results.values() for r in rs for k in r["eval"] if k.endswith(suffix)})
        if not per_task:
            continue
        lines += ["", f"{title}:", "", "| method | " + " | ".join(per_task) + " |",
                  "|---" * (len(per_task) + 1) + "|"]
        lines.append("| SFT | " + " | ".join(f"{sft_eval.get(k, float('nan')):.3f}" for k in per_task) + " |")
        for m, rs in results.items():
            lines.append(f"| {m} | " + " | ".join(mean_sd([r['eval'].get(k, float('nan')) for r in rs])
                                                  for k in per_task) + " |")
    (out / "axpo_vs_grpo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    # 4. Curves: mean over seeds with min-max band.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label in (("tool_use_rate", "tool-use rate (RL rollouts)"), ("accuracy", "accuracy (RL rollouts)")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m, rs in results.items():
            steps = [r["step"] for r in rs[0]["rl"]]
            vals = [[r2[key] for r2 in r["rl"]] for r in rs]
            mean = [statistics.mean(v[i] for v in vals) for i in range(len(steps))]
            ax.plot(steps, mean, label=m)
            ax.fill_between(steps, [min(v[i] for v in vals) for i in range(len(steps))],
                            [max(v[i] for v in vals) for i in range(len(steps))], alpha=0.15)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"axpo_vs_grpo_{key}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
