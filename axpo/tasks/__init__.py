"""Built-in tasks, generated procedurally from a seed (no downloads).

    samples = generate_task("perception", n=256, seed=1234, options={"grid": 4})
    demos = make_demonstrations(samples, build_tools(["image_zoom_in"]), seed=1234)
    reward = verify(sample, response_text)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from axpo.registry import TASK_REGISTRY, register_task
from axpo.tasks import calculation, lockers, perception, search_facts
from axpo.tasks.base import (Demonstration, Sample, TaskSpec, answers_match, extract_answer,
                             normalize_text, parse_number, user_message, verify)
from axpo.tasks.demonstrations import DemoConfig, count_images, make_demonstrations

# The task registry (axpo.register_task adds to it); the built-in tasks register like plugins.
TASKS = TASK_REGISTRY
# The default run's tasks, and the text the tiny tokenizer is trained on (axpo/tiny.py). The lockers
# task (AXPO's precondition experiment, benchmarks/axpo_vs_grpo.py) is registered too but kept out
# of this tuple so the tokenizer and the default run stay as they were.
BUILTIN_TASKS = ("perception", "calculation", "search")
for _spec in (perception.SPEC, calculation.SPEC, search_facts.SPEC, lockers.SPEC):
    register_task(_spec.name, _spec)

__all__ = [
    "TASKS", "BUILTIN_TASKS", "register_task", "Sample", "Demonstration", "TaskSpec", "DemoConfig", "extract_answer", "verify",
    "answers_match", "normalize_text", "parse_number", "user_message", "generate_task",
    "task_config", "make_demonstrations", "count_images",
]


def task_config(name: str, options: dict[str, Any] | None = None):
    """The task's typed config from a plain dict (e.g. DataConfig.task_options[name]);
    unknown keys are errors naming the valid ones."""
    cls = TASKS.get(name).config_cls   # an unknown name raises, listing the registered tasks
    options = dict(options or {})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for task {name!r}; valid: {', '.join(sorted(valid))}")
    for f in dataclasses.fields(cls):  # YAML gives lists where the config has tuples
        if f.name in options and isinstance(options[f.name], list) and "tuple" in str(f.type):
            options[f.name] = tuple(options[f.name])
    return cls(**options)


def generate_task(name: str, n: int, seed: int, options: dict[str, Any] | None = None,
                  start: int = 0) -> list[Sample]:
    """Samples start .. start+n-1 of the task's stream for `seed` (each depends only on its index)."""
    return TASKS[name].generate(n, seed, task_config(name, options), start)
