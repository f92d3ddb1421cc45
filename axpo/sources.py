"""Where a run's questions, demonstrations, tools and reward come from: the built-in procedural
tasks by default, or user JSONL/parquet files (`data.train_file`, `data.eval_file`,
`data.sft_file`). Held-out evaluation questions come from a seed disjoint from training."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from axpo.agent.trajectory import Trajectory
from axpo.config import Config
from axpo.data import load_demonstrations, load_samples
from axpo.tasks import DemoConfig, generate_task, task_config, verify
from axpo.tasks.demonstrations import LazyDemonstrations
from axpo.tools import TOOL_NAMES, build_tools
from axpo.tools.base import ToolRegistry

# Seeds of the three built-in splits are offset so the sets do not share questions.
EVAL_SEED_OFFSET = 10_007
SFT_SEED_OFFSET = 20_011


@dataclass
class Sources:
    train: list
    eval: list
    demos: Sequence  # Demonstration items; built-in ones are made lazily (LazyDemonstrations)
    tools: ToolRegistry
    skipped_rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._by_uid = {s.uid: s for s in self.train + self.eval}

    def reward(self, traj: Trajectory) -> float:
        """Binary outcome reward; a trajectory without a final answer scores 0."""
        if not traj.finished:
            return 0.0
        return float(verify(self._by_uid[traj.sample_uid], traj.final_text))


def _loaded(path: str, kind: str, on_bad_row: str, skipped: dict) -> list:
    loader = load_samples if kind != "sft" else load_demonstrations
    out = loader(path, on_bad_row=on_bad_row)
    if out.skipped:
        skipped[path] = out.skipped
        print(f"{path}: skipped {out.skipped} bad rows (data.on_bad_row=skip); first: {out.errors[0]}",
              file=sys.stderr)
    return out.items


def build_sources(cfg: Config, fmt=None) -> Sources:
    d = cfg.data
    skipped: dict[str, int] = {}
    documents = None
    if "search" in d.tasks:
        from axpo.tasks.search_facts import build_corpus

        documents = build_corpus(task_config("search", d.task_options.get("search")))
    tools = build_tools(list(TOOL_NAMES), cfg.tools, documents=documents)

    def builtin(seed: int, size: int) -> list:
        out = []
        for name in d.tasks:
            out += generate_task(name, size, seed, d.task_options.get(name))
        return out

    train = _loaded(d.train_file, "rl", d.on_bad_row, skipped) if d.train_file else builtin(d.seed, d.train_size)
    evals = _loaded(d.eval_file, "rl", d.on_bad_row, skipped) if d.eval_file else \
        builtin(d.seed + EVAL_SEED_OFFSET, d.eval_size)
    if d.sft_file:
        demos = _loaded(d.sft_file, "sft", d.on_bad_row, skipped)
    else:
        demos = LazyDemonstrations(d.tasks, d.sft_size, d.seed + SFT_SEED_OFFSET, tools, d.task_options,
                                   demo_seed=d.seed, cfg=DemoConfig(**d.demo_options))
    return Sources(train, evals, demos, tools, skipped)
