"""Lockers: a task whose tool argument is learnable and only partly right, AXPO's precondition.

"Lockers 1 to 9 hold letters A to F. Which letter is in locker 7?" The letters are
hidden: only `open_locker` (axpo/tools/lockers.py) reveals one, so without the tool the best answer
is a guess (1 in `options`). The target's letter appears in no other locker, so opening a wrong
locker misleads: its letter is always a wrong answer. With the right locker the answer is a
one-token copy of the tool's reply.

What the policy must learn is the argument: copy the question's locker number into the call. The
reasoning before the call does not name the locker (`think_names_target=False`, the default), so a
call resampled from the same reasoning prefix succeeds as often as a fresh one; that is the
situation AXPO's resampling is built for. With `think_names_target=True` the prefix fixes the
argument and resampling the call cannot help (a control).

SFT demonstrations leave the argument weak on purpose: `DemoConfig.wrong_call_prob` is the chance
that a demonstrated call opens a wrong locker (uniform over the others), so the demonstrated
argument skill is `1 - wrong_call_prob` (`argument_skill(...)` converts).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

from axpo.tasks.base import ANSWER_INSTRUCTION, Sample, TaskSpec
from axpo.tools.base import ToolResult

@dataclass
class LockersConfig:
    slots: int = 9                       # lockers per question (1..slots)
    options: int = 6                     # letters A.. (guessing scores 1/options)
    think_names_target: bool = False     # the reasoning before the call names the locker
    tools: list[str] = field(default_factory=lambda: ["open_locker"])

    def __post_init__(self):
        if not 2 <= self.slots <= 99:
            raise ValueError(f"lockers: slots = {self.slots}: must be in [2, 99]")
        if not 2 <= self.options <= 26:
            raise ValueError(f"lockers: options = {self.options}: must be in [2, 26]")


def generate(n: int, seed: int, cfg: LockersConfig | None = None, start: int = 0) -> list[Sample]:
    cfg = cfg or LockersConfig()
    letters = string.ascii_uppercase[: cfg.options]
    out = []
    for i in range(start, start + n):  # sample i depends only on (seed, i)
        rng = random.Random(f"lockers-{seed}-{i}")
        k = rng.randint(1, cfg.slots)
        answer = rng.choice(letters)
        others = [c for c in letters if c != answer]
        slots = [answer if j == k else rng.choice(others) for j in range(1, cfg.slots + 1)]
        out.append(Sample(
            uid=f"lockers-{seed}-{i}", task="lockers",
            question=(f"Lockers 1 to {cfg.slots} hold letters {letters[0]} to {letters[-1]}. "
                      f"Which letter is in locker {k}? {ANSWER_INSTRUCTION}"),
            images=[], answer=answer, answer_type="exact", tools=list(cfg.tools),
            oracle_call={"name": "open_locker", "arguments": {"locker": k}},
            meta={"slots": slots, "target": k, "options": cfg.options,
                  "think_names_target": cfg.think_names_target}))
    return out


def argument_skill(wrong_call_prob: float) -> float:
    """The demonstrated chance that a call opens the right locker."""
    return 1.0 - wrong_call_prob


def call_correct(sample: Sample, call: dict | None) -> bool:
    """Whether a call (name and arguments, as parsed from the rollout) opens the target locker."""
    if not call or call.get("name") != "open_locker":
        return False
    args = call.get("arguments") or {}
    return isinstance(args, dict) and args.get("locker") == sample.meta["target"]


# --------------------------------------------------------------------------------------------

_HOLDS = re.compile(r"Locker (\d+) holds \{([A-Z])\}\.")


def read_tool_output(sample: Sample, result: ToolResult) -> str | None:
    if result.error:
        return None
    m = _HOLDS.search(result.text)
    return m.group(2) if m else None


def answer_without_tool(sample: Sample, rng: random.Random) -> str:
    return rng.choice(string.ascii_uppercase[: sample.meta["options"]])


def wrong_call(sample: Sample, rng: random.Random) -> dict:
    """A wrong locker, uniform over the others."""
    k, n = sample.meta["target"], len(sample.meta["slots"])
    return {"name": "open_locker", "arguments": {"locker": rng.choice([j for j in range(1, n + 1) if j != k])}}


def random_call(sample: Sample, rng: random.Random) -> dict:
    return {"name": "open_locker", "arguments": {"locker": rng.randint(1, len(sample.meta["slots"]))}}


def plan_text(sample: Sample) -> str:
    if sample.meta.get("think_names_target"):
        return f"I will open locker {sample.meta['target']}."
    return "I will open a locker."


def direct_text(sample: Sample) -> str:
    return "I will guess."


def after_text(sample: Sample, reading: str | None) -> str:
    return f"It holds {{{reading}}}." if reading is not None else "I could not open it. I will guess."


SPEC = TaskSpec("lockers", LockersConfig, generate, read_tool_output, answer_without_tool, wrong_call,
                random_call, plan_text, direct_text, after_text, extras={"call_correct": call_correct})
