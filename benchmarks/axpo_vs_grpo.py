"""AXPO against GRPO where AXPO's precondition holds: the lockers task (configs/lockers.yaml).

    python benchmarks/axpo_vs_grpo.py                       # gate, then 4 arms x 8 paired seeds
    python benchmarks/axpo_vs_grpo.py --dose                # AXPO - GRPO at three measured argument skills
    python benchmarks/axpo_vs_grpo.py --seeds 0 1 --arms grpo axpo   # a part; run again to add more

From one SFT checkpoint per argument skill (the chance that a demonstrated call opens the right
locker, `data.demo_options.wrong_call_prob = 1 - skill`), every arm trains with the real trainer
(`torchrun axpo/train.py`) and is evaluated on the held-out questions:
  grpo         GRPO, group 8;
  brute_force  GRPO plus AXPO's extra budget spent on fresh full rollouts of the groups AXPO's
               selection picks (`algo.brute_force_plan=axpo`, `algo.max_extra_fraction` 0.25);
  grpo_2x      GRPO with twice the group (16): the paper's 100%-extra arm;
  axpo         AXPO at 25% extra.
Seeds are paired: seed s of every arm starts from the same checkpoint with `trainer.seed=s`.

The gate runs and is printed before any comparison. After SFT: P(right locker | call) in
[0.05, 0.2], accuracy after a right call >= 0.85, no-tool accuracy near chance (within 0.1 of
1/options), tool use in [0.3, 0.5]. Over AXPO's first `--gate-steps` steps (its seed-0 run, the
first run made, with the counts of any other AXPO seed already finished): resample success >= 0.08
and trigger rate >= 0.25. A failed gate says the
comparison would test nothing and stops (`--ignore-gate` runs it anyway and says so in the report).

Each (arm, seed) writes `result.json` in its run folder when it finishes; a run with one is not
trained again (a finished run from another config is an error, not reused), so the comparison
(about 3.5 hours on 2 cores: `--nproc 1`, two invocations at a time) can be run in parts. The report is
`benchmarks/results/axpo_vs_grpo.md` (and `axpo_dose.md`), with PNG curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from axpo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "grpo": ["algo.axpo=false", "algo.brute_force=false"],
    "brute_force": ["algo.axpo=false", "algo.brute_force=true", "algo.brute_force_plan=axpo"],
    "grpo_2x": ["algo.axpo=false", "algo.brute_force=false", "rollout.group_size=16"],
    "axpo": ["algo.axpo=true", "algo.brute_force=false"],
}
# Gate: eval key after "<task>/" -> (low, high) with None unbounded, or "chance" (1/options +- 0.1);
# RL rate over AXPO's first steps -> (low, None).
SFT_GATE = {
    "right_call_rate": (0.05, 0.2),
    "accuracy_after_right_call": (0.85, None),
    "accuracy_without_tool": "chance",
    "tool_use_rate": (0.3, 0.5),
}
RL_GATE = {"resample_success": (0.08, None), "trigger_rate": (0.25, None)}


def train(out: Path, config: str, nproc: int, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "axpo" / "train.py"), "--config", config, "--output-dir", str(out), *overrides]
    t = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"   # not with_suffix: "skill0.1_axpo_s0" has a dot
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}); see {log}")
    return time.time() - t


def latest_checkpoint(run: Path) -> Path | None:
    latest = run / "checkpoints" / "latest"
    return run / "checkpoints" / latest.read_text().strip() if latest.exists() else None


def pretrain_checkpoint(work: Path, args, common: list[str]) -> Path:
    """Copy pre-training, once for every argument skill."""
    run = work / "pretrain"
    if latest_checkpoint(run) is None or not (run / "wall_time_s").exists():
        secs = train(run, args.config, args.nproc, common + ["sft.steps=0", "rl.steps=0", "trainer.evaluate=false"])
        (run / "wall_time_s").write_text(f"{secs:.1f}\n")
        print(f"copy pre-training: {secs / 60:.1f} min", flush=True)
    return latest_checkpoint(run)


def sft_checkpoint(work: Path, skill: float, args, common: list[str]) -> tuple[Path, dict]:
    """The SFT checkpoint for an argument skill (trained once, from the shared pre-trained
    weights) and its after-SFT evaluation."""
    run = work / f"sft_skill{skill:g}"
    latest = run / "checkpoints" / "latest"
    evals = run / "evals.json"
    if not latest.exists() or not evals.exists() or "after_sft" not in json.loads(evals.read_text()):
        pre = pretrain_checkpoint(work, args, common)
        secs = train(run, args.config, args.nproc, common + [
            "rl.steps=0", f"trainer.init_from={pre}", "trainer.init_stage=sft",
            f"data.demo_options.wrong_call_prob={1 - skill:g}"])
        (run / "wall_time_s").write_text(f"{secs:.1f}\n")
        print(f"SFT at argument skill {skill:g}: {secs / 60:.1f} min", flush=True)
    return run / "checkpoints" / latest.read_text().strip(), json.loads(evals.read_text())["after_sft"]


def rl_counts(rl: list[dict], first: int | None = None) -> dict:
    """Rates over a run's RL steps from the summed per-step counts (never an average of rates)."""
    rl = rl[:first] if first else rl
    s = lambda k: sum(r.get(k, 0.0) for r in rl)  # noqa: E731
    ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
    return {
        "resample_success": ratio(s("n_extra_successes"), s("extra_rollouts")),
        "trigger_rate": ratio(s("n_triggered_groups"), s("n_groups")),
        "zero_var_before": ratio(s("n_zero_var_before"), s("n_groups")),
        "zero_var_after": ratio(s("n_zero_var_after"), s("n_groups")),
        "extra_rollouts": s("extra_rollouts"),
        "base_rollouts": s("n_base_rollouts"),
        "rollout_tokens": s("base_tokens") + s("extra_tokens"),
    }


def gate(task: str, sft_eval: dict, options: int, axpo_runs: list[list[dict]] | None, gate_steps: int
         ) -> list[tuple]:
    """(criterion, value, wanted, passed) rows. The RL part sums the counts of the first
    `gate_steps` steps of every AXPO run given (one seed: about 80 branches in 5 steps, so a
    success rate of 0.1 has a standard error of about 0.035)."""
    out = []
    for name, want in SFT_GATE.items():
        v = sft_eval.get(f"{task}/{name}", math.nan)
        if want == "chance":
            lo, hi = 1 / options - 0.1, 1 / options + 0.1
            wanted = f"1/{options} +- 0.1"
        else:
            lo, hi = want
            wanted = f">= {lo}" if hi is None else f"[{lo}, {hi}]"
        ok = v == v and v >= lo and (hi is None or v <= hi)
        out.append((f"after SFT: {name}", v, wanted, ok))
    if axpo_runs:
        c = rl_counts([r for run in axpo_runs for r in run[:gate_steps]])
        for name, (lo, _) in RL_GATE.items():
            v = c[name]
            out.append((f"AXPO steps 1-{gate_steps} ({len(axpo_runs)} seed{'s' * (len(axpo_runs) > 1)}): {name}",
                        v, f">= {lo}", v == v and v >= lo))
    return out


def config_differences(run: Path, config: str, overrides: list[str]) -> list[str]:
    """Fields where the config `run` was trained with (its config.yaml) differs from `config` +
    `overrides` (the output folder aside): a finished run is reused only if there are none."""
    import yaml

    from axpo.config import load_config, to_dict

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old = flat(yaml.safe_load((run / "config.yaml").read_text()))
    new = flat(json.loads(json.dumps(to_dict(load_config(config, overrides, check=False)))))
    def same(a, b) -> bool:   # a checkpoint reached through a link is the same checkpoint
        return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.exists(a)
                          and os.path.exists(b) and os.path.samefile(a, b))

    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if k != "trainer.output_dir" and not same(old.get(k), new.get(k))]


def run_arm(work: Path, tag: str, arm: str, seed: int, ckpt: Path, args, common: list[str]) -> dict:
    """Train one (arm, seed) unless its result.json exists (from the same config); return the result."""
    run = work / f"{tag}{arm}_s{seed}"
    res = run / "result.json"
    overrides = common + ARMS[arm] + [f"trainer.init_from={ckpt}", f"trainer.seed={seed}", "trainer.eval_after_sft=false"]
    if res.exists():
        diff = config_differences(run, args.config, overrides)
        if diff:
            raise SystemExit(f"{run} finished with another config ({'; '.join(diff[:3])}); "
                             "move it away or use another --work")
        return json.loads(res.read_text())
    secs = train(run, args.config, args.nproc, overrides)
    rl = [r for r in read_metrics(run) if r["stage"] == "rl"]
    ev = json.loads((run / "evals.json").read_text())["after_rl"]
    acc = [r["accuracy"] for r in rl]
    out = {"arm": arm, "seed": seed, "wall_s": secs, "eval": ev,
           "train_accuracy": acc, "tool_use": [r["tool_use_rate"] for r in rl],
           "accuracy_auc": statistics.mean(acc) if acc else math.nan,   # area under the curve / steps
           **rl_counts(rl), "rl_rows": rl}
    res.write_text(json.dumps(out))
    print(f"{tag}{arm} seed {seed}: {secs / 60:.1f} min, Pass@1 {ev.get('pass@1', math.nan):.3f}", flush=True)
    return out


def ms(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def paired(a: list[dict], b: list[dict], key) -> str:
    """Mean ± sd of a - b over the seeds both have, and how many are > 0."""
    bs = {r["seed"]: r for r in b}
    d = [key(r) - key(bs[r["seed"]]) for r in a if r["seed"] in bs]
    d = [x for x in d if x == x]
    if not d:
        return "n/a"
    sd = f" ± {statistics.stdev(d):.3f}" if len(d) > 1 else ""
    return f"{statistics.mean(d):+.3f}{sd} ({sum(x > 0 for x in d)}/{len(d)} > 0)"


def plot(results: dict[str, list[dict]], path_stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, label in (("tool_use", "tool-use rate (RL rollouts)"), ("train_accuracy", "accuracy (RL rollouts)")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for arm, rs in results.items():
            if not rs:
                continue
            n = min(len(r[key]) for r in rs)
            mean = [statistics.mean(r[key][i] for r in rs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{arm} ({len(rs)} seeds)")
            ax.fill_between(range(1, n + 1), [min(r[key][i] for r in rs) for i in range(n)],
                            [max(r[key][i] for r in rs) for i in range(n)], alpha=0.12)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        f = path_stem.with_name(f"{path_stem.name}_{key}.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "lockers.yaml"))
    ap.add_argument("--task", default="lockers", help="the config's task (its gate keys)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--skill", type=float, default=0.1, help="SFT argument skill of the main comparison")
    ap.add_argument("--dose", action="store_true", help="the dose-response instead: grpo and axpo at --dose-skills")
    # Demo skills whose SFT leaves measured right-call rates 0.118, 0.442, 0.734 (README): 0.02
    # and 0.3 leave the call at chance like 0.1, so they are only probed.
    ap.add_argument("--dose-skills", type=float, nargs="+", default=[0.1, 0.6, 0.8])
    ap.add_argument("--dose-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--probe-skills", type=float, nargs="*", default=[0.02, 0.3, 1.0],
                    help="with --dose: SFT checkpoints only measured (the demo skill -> measured skill map)")
    ap.add_argument("--gate-steps", type=int, default=5)
    ap.add_argument("--ignore-gate", action="store_true")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "axpo_vs_grpo"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = list(args.extra) + ["trainer.plots=false", "trainer.tensorboard=false"]
    options = _task_options(args)
    cmd = f"python benchmarks/axpo_vs_grpo.py {' '.join(sys.argv[1:])}".strip()
    if args.dose:
        return dose(args, work, out, common, options, cmd)

    ckpt, sft_eval = sft_checkpoint(work, args.skill, args, common)
    tag = f"skill{args.skill:g}_"
    print(_gate_table(gate(args.task, sft_eval, options, None, args.gate_steps)), flush=True)
    results: dict[str, list[dict]] = {a: [] for a in args.arms}
    axpo_first = None
    if "axpo" in args.arms:   # AXPO's first run first: its first steps finish the gate
        axpo_first = run_arm(work, tag, "axpo", args.seeds[0], ckpt, args, common)
    # The RL gate: AXPO's first run, plus every other AXPO seed already finished (more branches).
    axpo_runs = [axpo_first["rl_rows"]] if axpo_first else []
    for seed in args.seeds[1:] if axpo_first else []:
        res = work / f"{tag}axpo_s{seed}" / "result.json"
        if res.exists():
            axpo_runs.append(run_arm(work, tag, "axpo", seed, ckpt, args, common)["rl_rows"])
    rows = gate(args.task, sft_eval, options, axpo_runs or None, args.gate_steps)
    for seed, run in zip(args.seeds, axpo_runs):
        c = rl_counts(run, args.gate_steps)
        print(f"AXPO seed {seed}, steps 1-{args.gate_steps}: resample success {c['resample_success']:.3f}, "
              f"trigger rate {c['trigger_rate']:.3f}", flush=True)
    passed = all(r[3] for r in rows)
    print(_gate_table(rows), flush=True)
    if not passed and not args.ignore_gate:
        report = _header(cmd, args, ckpt, sft_eval) + ["## Gate: FAILED", "", _gate_table(rows), "",
                                                       "The comparison would test nothing here; it was not run."]
        (out / "axpo_vs_grpo.md").write_text("\n".join(report) + "\n")
        raise SystemExit("gate failed: this run would test nothing (see the table; --ignore-gate runs it anyway)")
    for seed in args.seeds:
        for arm in args.arms:
            results[arm].append(run_arm(work, tag, arm, seed, ckpt, args, common))

    lines = _header(cmd, args, ckpt, sft_eval)
    lines += [f"## Gate: {'passed' if passed else 'FAILED (run with --ignore-gate: it tests nothing)'}", "",
              _gate_table(rows), "", "## Arms", ""]
    lines += _arm_table(results, sft_eval, args.task)
    pairs = [(arm, "grpo") for arm in results if arm != "grpo" and results[arm] and results.get("grpo")]
    if results.get("axpo") and results.get("brute_force"):   # the same extra budget, spent two ways
        pairs.append(("axpo", "brute_force"))
    if pairs:
        lines += ["", "Paired differences (same seed), mean ± sd over seeds (seeds > 0):", "",
                  "| arms | Pass@1 | Pass@4 | final eval tool use | accuracy AUC |", "|---|---|---|---|---|"]
        keys = [lambda r, k=k: r["eval"].get(k, math.nan) for k in ("pass@1", "pass@4", "tool_use_rate")]
        keys.append(lambda r: r["accuracy_auc"])
        for a, b in pairs:
            lines.append(f"| {a} - {b} | " + " | ".join(paired(results[a], results[b], k) for k in keys) + " |")
    lines += ["", "Curves: " + ", ".join(f"`{f}`" for f in plot(results, out / "axpo_vs_grpo"))]
    (out / "axpo_vs_grpo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def dose(args, work: Path, out: Path, common: list[str], options: int, cmd: str) -> None:
    """AXPO - GRPO at each of `--dose-skills`. The dose is what SFT left, the measured P(right
    locker | call), not the demonstrations' skill: the two need not agree (`--probe-skills` adds
    SFT checkpoints that are only measured, to show the mapping between them)."""
    t = args.task
    lines = ["# AXPO - GRPO against the SFT argument skill (lockers)", "", f"Command: `{cmd}`", "",
             "Demo skill: the chance that a demonstrated call opens the right locker "
             "(`data.demo_options.wrong_call_prob = 1 - skill`). The dose is what SFT left: the measured "
             f"P(right locker | call) on the held-out questions (chance: 1/{_task_slots(args)}).", "",
             "## SFT checkpoints", "",
             "| demo skill | measured right-call rate | accuracy after a right call | tool use | Pass@1 |",
             "|---|---|---|---|---|"]
    sft = {}
    for skill in sorted(set(args.dose_skills) | set(args.probe_skills)):
        sft[skill] = sft_checkpoint(work, skill, args, common)
        ev = sft[skill][1]
        lines.append(f"| {skill:g} | {ev.get(f'{t}/right_call_rate', math.nan):.3f} | "
                     f"{ev.get(f'{t}/accuracy_after_right_call', math.nan):.3f} | "
                     f"{ev.get('tool_use_rate', math.nan):.3f} | {ev.get('pass@1', math.nan):.3f} |")
    lines += ["", "## RL from each dose", "",
              "Paired differences over seeds " + ", ".join(map(str, args.dose_seeds)) + " (seeds > 0).", "",
              "| demo skill | measured right-call rate | GRPO Pass@1 | AXPO Pass@1 | AXPO - GRPO Pass@1 | "
              "AXPO - GRPO final tool use | AXPO trigger rate | AXPO resample success | right-call rate after RL "
              "(GRPO / AXPO) |", "|---|---|---|---|---|---|---|---|---|"]
    for skill in args.dose_skills:
        ckpt, sft_eval = sft[skill]
        tag = f"skill{skill:g}_"
        res = {arm: [run_arm(work, tag, arm, s, ckpt, args, common) for s in args.dose_seeds] for arm in ("grpo", "axpo")}
        rc = lambda arm: ms([r["eval"].get(f"{t}/right_call_rate", math.nan) for r in res[arm]])  # noqa: E731
        lines.append(
            f"| {skill:g} | {sft_eval.get(f'{t}/right_call_rate', math.nan):.3f} | "
            f"{ms([r['eval'].get('pass@1', math.nan) for r in res['grpo']])} | "
            f"{ms([r['eval'].get('pass@1', math.nan) for r in res['axpo']])} | "
            f"{paired(res['axpo'], res['grpo'], lambda r: r['eval'].get('pass@1', math.nan))} | "
            f"{paired(res['axpo'], res['grpo'], lambda r: r['eval'].get('tool_use_rate', math.nan))} | "
            f"{ms([r['trigger_rate'] for r in res['axpo']])} | {ms([r['resample_success'] for r in res['axpo']])} | "
            f"{rc('grpo')} / {rc('axpo')} |")
        (out / "axpo_dose.md").write_text("\n".join(lines) + "\n")
    (out / "axpo_dose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _task_slots(args) -> int:
    from axpo.config import load_config

    cfg = load_config(args.config, list(args.extra))
    return int(cfg.data.task_options.get(args.task, {}).get("slots", 9))


def _task_options(args) -> int:
    from axpo.config import load_config

    cfg = load_config(args.config, list(args.extra))
    return int(cfg.data.task_options.get(args.task, {}).get("options", 6))


def _gate_table(rows: list[tuple]) -> str:
    return "\n".join(["| gate criterion | value | wanted | |", "|---|---|---|---|"]
                     + [f"| {n} | {v:.3f} | {w} | {'pass' if ok else 'FAIL'} |" for n, v, w, ok in rows])


def _header(cmd: str, args, ckpt: Path, sft_eval: dict) -> list[str]:
    rel = lambda p: str(Path(p).relative_to(ROOT)) if Path(p).resolve().is_relative_to(ROOT) else str(p)  # noqa: E731
    return ["# AXPO vs GRPO on the lockers task", "", f"Command: `{cmd}`  ",
            f"Config `{rel(args.config)}`, SFT argument skill {args.skill:g}, checkpoint `{rel(ckpt)}`, "
            f"seeds {args.seeds}, {args.nproc} processes. Held-out evaluation: "
            f"{sft_eval.get('questions', '?')} questions x trainer.eval_samples samples.", ""]


def _arm_table(results: dict[str, list[dict]], sft_eval: dict, task: str) -> list[str]:
    lines = ["Mean ± sample std over seeds. Rates over RL steps come from summed counts. Zero-variance: "
             "groups whose rollouts all got the same reward, before and after the step's extra rollouts.", "",
             "| arm | seeds | Pass@1 | Pass@4 | final eval tool use | right-call rate (eval) | accuracy AUC | "
             "resample success | trigger rate | zero-var before -> after | extra / base rollouts | min / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| SFT (start) | | {sft_eval.get('pass@1', math.nan):.3f} | {sft_eval.get('pass@4', math.nan):.3f} | "
             f"{sft_eval.get('tool_use_rate', math.nan):.3f} | {sft_eval.get(f'{task}/right_call_rate', math.nan):.3f} "
             "| | | | | | |"]
    for arm, rs in results.items():
        if not rs:
            continue
        col = lambda k: [r[k] for r in rs]  # noqa: E731
        ev = lambda k: [r["eval"].get(k, math.nan) for r in rs]  # noqa: E731
        lines.append(
            f"| {arm} | {len(rs)} | {ms(ev('pass@1'))} | {ms(ev('pass@4'))} | {ms(ev('tool_use_rate'))} | "
            f"{ms(ev(f'{task}/right_call_rate'))} | {ms(col('accuracy_auc'))} | {ms(col('resample_success'))} | "
            f"{ms(col('trigger_rate'))} | {ms(col('zero_var_before'))} -> {ms(col('zero_var_after'))} | "
            f"{statistics.mean(r['extra_rollouts'] / max(1, r['base_rollouts']) for r in rs):.3f} | "
            f"{statistics.mean(col('wall_s')) / 60:.1f} |")
    return lines


if __name__ == "__main__":
    main()
