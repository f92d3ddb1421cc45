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
from axpo.registry import REWARDS, RewardFn, make_tool
from axpo.tasks import DemoConfig, generate_task, task_config
from axpo.tasks.demonstrations import LazyDemonstrations
from axpo.tools import tool_set_config
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
    reward_impl: RewardFn | None = None   # None: the built-in `verify`

    def __post_init__(self):
        self._by_uid = {"train": _by_uid(self.train, "train"), "eval": _by_uid(self.eval, "eval")}
        if self.reward_impl is None:
            import axpo.rewards  # noqa: F401  (registers "verify")

            self.reward_impl = REWARDS["verify"]

    def sample_of(self, traj: Trajectory, split: str):
        sample = self._by_uid[split].get(traj.sample_uid)
        if sample is None:
            raise KeyError(f"reward: trajectory {traj.uid} is for question {traj.sample_uid!r}, "
                           f"which is not in the {split} split")
        return sample

    def reward(self, traj: Trajectory, split: str) -> float:
        """The run's reward (`data.reward`, default `verify`: 1.0 for a right final answer, 0.0
        otherwise or without one) of a trajectory of `split`'s question ("train" or "eval")."""
        return self.reward_impl.score([self.sample_of(traj, split)], [traj])[0]

    def score(self, trajs: list[Trajectory], split: str) -> list[float]:
        """Rewards of many trajectories in one call (one call of a batched reward function)."""
        return self.reward_impl.score([self.sample_of(t, split) for t in trajs], trajs)

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


def _loaded(path: str, kind: str, on_bad_row: str, skipped: dict, default_tools: list[str],
            known_tools: list[str]) -> list:
    """A user file's rows. A row without `tools` gets the run's default tools (`tools.enabled`);
    `"tools": []` means none; a name that is not registered is a bad row."""
    loader = load_samples if kind != "sft" else load_demonstrations
    out = loader(path, on_bad_row=on_bad_row, default_tools=default_tools, known_tools=known_tools)
    if out.skipped:
        skipped[path] = out.skipped
        print(f"{path}: skipped {out.skipped} bad rows (data.on_bad_row=skip); first: {out.errors[0]}",
              file=sys.stderr)
    return out.items


def _reward(cfg: Config, reward) -> RewardFn:
    if reward is None:
        import axpo.rewards  # noqa: F401  (registers "verify")

        return REWARDS[cfg.data.reward]
    if isinstance(reward, RewardFn):
        return reward
    if isinstance(reward, str):
        return REWARDS[reward]
    if callable(reward):
        return RewardFn(reward)
    raise TypeError(f"reward must be a registered name, a function (sample, trajectory) -> float or a "
                    f"RewardFn, got {type(reward).__name__}")


def build_sources(cfg: Config, fmt=None, *, tools: list | None = None, reward=None) -> Sources:
    """The run's questions, demonstrations, tools and reward. `tools`: Tool objects offered in
    addition to `tools.enabled` (by default too); `reward`: a function (sample, trajectory) ->
    float, a RewardFn or a registered name, instead of `data.reward`."""
    d = cfg.data
    skipped: dict[str, int] = {}
    documents = None
    if "search" in d.tasks:
        from axpo.tasks.search_facts import build_corpus

        documents = build_corpus(task_config("search", d.task_options.get("search")))

    def builtin(seed: int, size: int) -> list:
        out = []
        for name in d.tasks:
            out += generate_task(name, size, seed, d.task_options.get(name))
        return out

    objects = list(tools or [])
    default_names = list(dict.fromkeys([*cfg.tools.enabled, *(t.name for t in objects)]))
    train = None if d.train_file else builtin(d.seed, d.train_size)
    evals = None if d.eval_file else builtin(d.seed + EVAL_SEED_OFFSET, d.eval_size)
    # Built-in tasks name the tools they need (perception: zoom); those are built even if not enabled.
    needed = [n for split in (train or [], evals or []) for s in split for n in s.tools]
    if not d.sft_file:
        needed += [n for name in d.tasks for n in getattr(task_config(name, d.task_options.get(name)), "tools", [])]
    names = list(dict.fromkeys([*default_names, *needed]))
    own = {t.name for t in objects}
    registry = ToolRegistry([make_tool(n, cfg=tool_set_config(cfg.tools), documents=documents)
                             for n in names if n not in own] + objects)
    known = registry.names
    if "python" in registry.tools and hasattr(registry.tools["python"], "check"):
        # Fail at start-up, not with "sandbox unavailable" inside every demonstration and rollout.
        registry.tools["python"].check()
    if train is None:
        train = _loaded(d.train_file, "rl", d.on_bad_row, skipped, default_names, known)
    if evals is None:
        evals = _loaded(d.eval_file, "rl", d.on_bad_row, skipped, default_names, known)
    if d.sft_file:
        demos = _loaded(d.sft_file, "sft", d.on_bad_row, skipped, default_names, known)
    else:
        demos = LazyDemonstrations(d.tasks, d.sft_size, d.seed + SFT_SEED_OFFSET, registry, d.task_options,
                                   demo_seed=d.seed, cfg=DemoConfig(**d.demo_options))
    return Sources(train, evals, demos, registry, skipped, _reward(cfg, reward))
