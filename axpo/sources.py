"""Where a run's questions, demonstrations, tools and reward come from: the built-in procedural
tasks by default, or user JSONL/parquet files (`data.train_file`, `data.eval_file`,
`data.sft_file`). Held-out evaluation questions come from a seed disjoint from training.

Rewards look a trajectory's question up by id in its own split's table (`reward(traj, "train")`,
`reward_fn("eval")`): a training and an evaluation question may share an id without either
being scored against the other's answer."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
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
        self._by_uid = {"train": _by_uid(self.train, "train"), "eval": _by_uid(self.eval, "eval")}

    def reward(self, traj: Trajectory, split: str) -> float:
        """Binary outcome reward of a trajectory of `split`'s question ("train" or "eval"); one
        without a final answer scores 0."""
        table = self._by_uid[split]
        sample = table.get(traj.sample_uid)
        if sample is None:
            raise KeyError(f"reward: trajectory {traj.uid} is for question {traj.sample_uid!r}, "
                           f"which is not in the {split} split")
        if not traj.finished:
            return 0.0
        return float(verify(sample, traj.final_text))

    def reward_fn(self, split: str) -> Callable[[Trajectory], float]:
        if split not in self._by_uid:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return lambda traj: self.reward(traj, split)


def _by_uid(samples: list, split: str) -> dict:
    table: dict = {}
    for s in samples:
        if s.uid in table:
            raise ValueError(f"{split} questions: id {s.uid!r} is used twice ({_where(table[s.uid])} and "
                             f"{_where(s)}); rewards look questions up by id")
        table[s.uid] = s
    return table


def _where(s) -> str:
    src, line = s.meta.get("source"), s.meta.get("line", s.meta.get("row"))
    return f"{src}: line {line}" if src is not None else f"task {s.task}"


def _loaded(path: str, kind: str, on_bad_row: str, skipped: dict, tools: ToolRegistry) -> list:
    """A user file's rows. A row without `tools` gets every registered tool (as the built-in
    tasks' prompts do); `"tools": []` means none; an unregistered name is a bad row."""
    loader = load_samples if kind != "sft" else load_demonstrations
    names = list(tools.tools)
    out = loader(path, on_bad_row=on_bad_row, default_tools=names, known_tools=names)
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

    train = _loaded(d.train_file, "rl", d.on_bad_row, skipped, tools) if d.train_file else \
        builtin(d.seed, d.train_size)
    evals = _loaded(d.eval_file, "rl", d.on_bad_row, skipped, tools) if d.eval_file else \
        builtin(d.seed + EVAL_SEED_OFFSET, d.eval_size)
    if d.sft_file:
        demos = _loaded(d.sft_file, "sft", d.on_bad_row, skipped, tools)
    else:
        demos = LazyDemonstrations(d.tasks, d.sft_size, d.seed + SFT_SEED_OFFSET, tools, d.task_options,
                                   demo_seed=d.seed, cfg=DemoConfig(**d.demo_options))
    return Sources(train, evals, demos, tools, skipped)
