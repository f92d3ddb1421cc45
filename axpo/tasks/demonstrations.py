"""SFT demonstrations: chat transcripts whose tool responses come from running the real tools.

The mix is deliberately imperfect (the paper's starting point for RL): most demonstrations answer
directly (a guess, often wrong), a minority call a tool, and many of those calls are wrong (wrong
box, mistyped number, wrong query), after which the answer is read off the useless result or
guessed. A correct call always makes the answer readable. After SFT on this mix a small policy
acts rarely and often badly: the Thinking-Acting Gap that AXPO targets.

Message format (Hugging Face; Qwen3-VL's template renders tool_calls as <tool_call> JSON and
tool turns as <tool_response> inside a user turn):
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    {"role": "assistant", "reasoning_content": "...", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...}}}]}
    {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": tool output}]}
    {"role": "assistant", "reasoning_content": "...", "content": "The answer is \\boxed{...}."}
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from axpo.tasks.base import Demonstration, Sample, TaskSpec, answers_match, user_message
from axpo.tools.base import ToolContext, ToolRegistry, ToolResult


@dataclass
class DemoConfig:
    tool_prob: float = 0.35        # share of demonstrations that call a tool
    wrong_call_prob: float = 0.5   # share of those calls that are wrong
    retry_prob: float = 0.0        # after a wrong call, share that makes a second, correct call


def _call_message(spec: TaskSpec, sample: Sample, call: dict, first: bool) -> dict:
    think = spec.plan_text(sample) if first else "That did not work. I will try again."
    return {"role": "assistant", "reasoning_content": think, "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}


def _tool_message(result: ToolResult) -> dict:
    content: list[dict] = [{"type": "image"} for _ in result.images]
    content.append({"type": "text", "text": result.text})
    return {"role": "tool", "content": content}


def _answer_message(think: str, answer: str) -> dict:
    return {"role": "assistant", "reasoning_content": think, "content": f"The answer is \\boxed{{{answer}}}."}


def demonstrate(sample: Sample, spec: TaskSpec, registry: ToolRegistry, rng: random.Random,
                cfg: DemoConfig) -> Demonstration:
    messages = [user_message(sample)]
    images = list(sample.images)
    tools = [t for t in sample.tools if t in registry.tools]
    if not tools or sample.oracle_call is None or rng.random() >= cfg.tool_prob:
        guess = spec.answer_without_tool(sample, rng)
        messages.append(_answer_message(spec.direct_text(sample), guess))
        return Demonstration(messages, images, used_tool=False, tool_call_correct=None, tools=tools, uid=sample.uid)

    calls = [sample.oracle_call]
    if rng.random() < cfg.wrong_call_prob:
        calls = [spec.wrong_call(sample, rng)]
        if rng.random() < cfg.retry_prob:
            calls.append(sample.oracle_call)
    reading, correct = None, False
    for i, call in enumerate(calls):
        messages.append(_call_message(spec, sample, call, first=i == 0))
        # The real tool, through the registry, exactly as in a rollout.
        _, result = registry.execute(json.dumps({"name": call["name"], "arguments": call["arguments"]}),
                                     ToolContext(images=list(images), sample=sample))
        messages.append(_tool_message(result))
        images.extend(result.images)
        reading = spec.read_tool_output(sample, result)
        correct = answers_match(sample, reading)
    answer = reading if reading is not None else spec.answer_without_tool(sample, rng)
    messages.append(_answer_message(spec.after_text(sample, reading), answer))
    return Demonstration(messages, images, used_tool=True, tool_call_correct=correct, tools=tools, uid=sample.uid)


def make_demonstrations(samples: list[Sample], registry: ToolRegistry, seed: int = 0,
                        cfg: DemoConfig | None = None) -> list[Demonstration]:
    """One demonstration per sample (deterministic in seed). `registry` must hold the samples'
    tools (e.g. `build_tools(["image_zoom_in", "python", "search"])`)."""
    from axpo.tasks import TASKS

    cfg = cfg or DemoConfig()
    out = []
    for sample in samples:
        if sample.task not in TASKS:
            raise ValueError(f"no demonstration generator for task {sample.task!r}")
        rng = random.Random(f"demo-{seed}-{sample.uid}")
        out.append(demonstrate(sample, TASKS[sample.task], registry, rng, cfg))
    return out


class LazyDemonstrations(Sequence):
    """`size` demonstrations per task, made on first access (sample, real tool calls and all).

    SFT visits each demonstration about once, on one rank, so generating all of them up front
    would cost every rank the whole set's tool calls and hold every full-resolution image (about
    5 MB per perception sample). Item i is the same on every rank and in every run: it depends
    only on (task, seed, index). Nothing is cached here; the trainer caches encoded tokens."""

    def __init__(self, tasks: list[str], size: int, seed: int, registry: ToolRegistry,
                 task_options: dict[str, Any] | None = None, demo_seed: int = 0,
                 cfg: DemoConfig | None = None):
        self.tasks, self.size, self.seed, self.registry = list(tasks), size, seed, registry
        self.task_options = task_options or {}
        self.demo_seed, self.cfg = demo_seed, cfg or DemoConfig()

    def __len__(self) -> int:
        return len(self.tasks) * self.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"demonstration {i} out of range ({len(self)})")
        i %= len(self)
        from axpo.tasks import generate_task

        task = self.tasks[i // self.size]
        [sample] = generate_task(task, 1, self.seed, self.task_options.get(task), start=i % self.size)
        return make_demonstrations([sample], self.registry, self.demo_seed, self.cfg)[0]


def count_images(messages: list[dict]) -> int:
    """Number of {"type": "image"} entries across all messages (must equal len(images))."""
    n = 0
    for m in messages:
        if isinstance(m.get("content"), list):
            n += sum(1 for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")
    return n
