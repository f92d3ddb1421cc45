"""Run logging on rank 0: `metrics.jsonl` (one object per step), TensorBoard, optional wandb, a tqdm
progress bar with the key numbers, and at the end PNG plots and a short `summary.md`.

metrics.jsonl may hold NaN/Infinity (a step skipped for a non-finite loss logs the real value, with
skipped=1); json reads them back. A torn last line (a run killed mid-write) is dropped with a
warning when read; on --resume, rows logged after the checkpoint are removed (they are re-run)."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

KEY_METRICS = ("loss", "reward", "accuracy", "tool_use_rate", "trigger_rate")
PLOTS = ("loss", "reward", "accuracy", "tool_use_rate", "all_wrong_rate", "entropy", "copy_accuracy")
STAGE_ORDER = {"pretrain": 0, "sft": 1, "rl": 2, "eval": 3}


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None, resume: bool = False):
        if wandb:
            check_wandb()
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        if wandb:
            import wandb as wb

            self.wandb = wb.init(project="axpo", dir=str(self.dir), config=config, resume="allow")

    def truncate_after(self, stage: str, step: int, keep_evals=()) -> int:
        """Resuming from the checkpoint of (stage, step): drop the rows of later steps (and the
        evaluation rows not in `keep_evals`; evaluations follow the stages) and any unreadable
        line, rewriting the file atomically. Returns the number of lines dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        at = (STAGE_ORDER[stage], step)
        kept, dropped = [], 0
        for _, line, row in _rows(self.path):
            if row is None:
                dropped += 1
            elif row["stage"] == "eval" and row["step"] not in keep_evals:
                dropped += 1
            elif row["stage"] in ("pretrain", "sft", "rl") and (STAGE_ORDER[row["stage"]], row["step"]) > at:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        return dropped

    def start_stage(self, stage: str, total: int, initial: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True, leave=True)

    def log(self, stage: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": step, "time": time.time(),
               **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        # Append-only; after a resume, rows of re-run steps repeat and read_metrics keeps the last.
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        # One TensorBoard x-axis for the whole run: stages follow each other.
        gstep = 100000 * STAGE_ORDER.get(stage, 4) + step
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(f"{stage}/{k}", v, gstep)
        if self.wandb is not None:
            self.wandb.log({f"{stage}/{k}": v for k, v in metrics.items()}, step=gstep)
        if self.bar is not None and stage != "eval":
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in KEY_METRICS if k in metrics})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_wandb() -> None:
    """trainer.wandb=true needs the optional wandb package; say so before the run starts."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ImportError("trainer.wandb=true needs the wandb package: pip install -e .[wandb] "
                          "(or pip install wandb); or set trainer.wandb=false") from None


def _rows(path: Path):
    """(line number, raw line, row or None) for each non-blank line; None for a line that is not
    a metrics row (warned about: a torn last line after a crash)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            ok = isinstance(r, dict) and isinstance(r.get("stage"), str) and isinstance(r.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            torn = " (a torn last line: the run was stopped while writing it)" if n == len(lines) else ""
            warnings.warn(f"{path}: line {n} is not a metrics row{torn}; skipped", stacklevel=3)
            r = None
        yield n, line, r


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of metrics.jsonl; if a (stage, step) repeats, the last row wins."""
    rows = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    for _, _, r in _rows(path):
        if r is not None:
            rows[(r["stage"], r["step"])] = r
    return sorted(rows.values(), key=lambda r: (STAGE_ORDER.get(r["stage"], 4), r["step"]))


def plot_run(run_dir: str | Path, stage: str = "rl") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if r["stage"] == stage]
    out = []
    for key in PLOTS:
        # NaN/inf (skipped steps) are gaps in the line.
        pts = [(r["step"], r[key] if math.isfinite(r[key]) else math.nan) for r in rows
               if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_xlabel(f"{stage} step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(run_dir) / f"{stage}_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def write_summary(run_dir: str | Path, *, evals: dict, wall_time: float, config_name: str) -> Path:
    rows = read_metrics(run_dir)
    rl = [r for r in rows if r["stage"] == "rl"]
    lines = [f"# Run summary ({config_name})", "", f"Wall time: {wall_time / 60:.1f} min", ""]
    pre = [r for r in rows if r["stage"] == "pretrain"]
    if pre:
        acc = [(r["step"], r["copy_accuracy"]) for r in pre if "copy_accuracy" in r]
        lines += ["## Copy pre-training", "", f"{pre[-1]['step']} steps, final loss {pre[-1]['loss']:.3f}; "
                  "held-out content-based copy accuracy " + ", ".join(f"{a:.3f} (step {s})" for s, a in acc), ""]
    sft = [r for r in rows if r["stage"] == "sft"]
    if sft:
        def mean_of(rs, k):
            v = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            return sum(v) / len(v) if v else float("nan")

        n = min(10, len(sft))
        skipped = sum(1 for r in sft if r.get("skipped"))
        lines += ["## SFT", "", f"{sft[-1]['step']} steps; loss {mean_of(sft[:n], 'loss'):.3f} -> "
                  f"{mean_of(sft[-n:], 'loss'):.3f} (mean of the first vs last {n} steps); "
                  f"{mean_of(sft, 'tokens_per_s'):.0f} tokens/s; {skipped} skipped steps", ""]
    if evals:
        # One row per metric (overall first, then per task), one column per checkpoint.
        keys = sorted({k for e in evals.values() for k in e}, key=lambda k: ("/" in k, k))
        names = list(evals)
        lines += ["## Evaluation (held-out questions)", "",
                  "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{evals[n].get(k, float('nan')):.3f}" for n in names) + " |")
        lines.append("")
    if rl:
        def avg(rs, k):
            v = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            return sum(v) / len(v) if v else float("nan")

        q = max(1, len(rl) // 4)
        lines += ["## RL (first vs last quarter of steps)", "", "| metric | first | last |", "|---|---|---|"]
        for k in ("reward", "accuracy", "tool_use_rate", "tool_error_rate", "all_wrong_rate", "trigger_rate",
                  "resample_success_rate", "extra_token_share", "entropy"):
            lines.append(f"| {k} | {avg(rl[:q], k):.3f} | {avg(rl[-q:], k):.3f} |")
        lines.append("")
    path = Path(run_dir) / "summary.md"
    path.write_text("\n".join(lines))
    return path
