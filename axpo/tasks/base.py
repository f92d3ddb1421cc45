"""Samples, demonstrations, answer extraction and verification shared by all tasks.

A task module provides a typed config, `generate(n, seed, cfg) -> list[Sample]` and a `TaskSpec`
with the scripted-policy pieces (programmatic readers, wrong and random calls, short reasoning
texts) used by the demonstration generator and `benchmarks/task_tool_table.py`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import random

    from PIL import Image

    from axpo.tools.base import ToolResult

ANSWER_INSTRUCTION = "Put the final answer in \\boxed{}."
LETTERS = string.ascii_uppercase


@dataclass
class Sample:
    uid: str
    task: str                               # "perception" | "calculation" | "search" | user-defined
    question: str                           # self-contained: options and answer instruction included
    images: list["Image.Image"]
    answer: str
    answer_type: str                        # "exact" | "numeric" | "choice"
    choices: list[str] | None = None        # for "choice": option texts, lettered A, B, ... in order
    tools: list[str] = field(default_factory=list)   # tool names offered for this sample
    oracle_call: dict | None = None         # {"name": ..., "arguments": {...}}: a correct call
    meta: dict = field(default_factory=dict)


@dataclass
class Demonstration:
    messages: list[dict]                    # Hugging Face chat messages (see demonstrations.py)
    images: list["Image.Image"]             # in order of the {"type": "image"} entries
    used_tool: bool
    tool_call_correct: bool | None          # None when no tool was used
    tools: list[str] = field(default_factory=list)   # tool names to render with `tools=`
    uid: str = ""


def user_message(sample: Sample) -> dict:
    """The first user turn for a sample: its images, then the question. Rollouts and
    demonstrations both build the prompt with this, so SFT and RL see the same text."""
    content: list[dict] = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": sample.question})
    return {"role": "user", "content": content}


def format_choices(choices: list[str]) -> str:
    return " ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


# --------------------------------------------------------------------------------------------
# Answer extraction


def _boxed_contents(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1])
    return out


def extract_answer(response_text: str) -> str | None:
    """Content of the last \\boxed{...} after the last </think> (the whole text if none)."""
    tail = response_text.rsplit("</think>", 1)[-1]
    boxed = _boxed_contents(tail)
    return boxed[-1].strip() if boxed else None


# --------------------------------------------------------------------------------------------
# Normalisation and verification

_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def normalize_text(s: str) -> str:
    """Case, punctuation, articles and whitespace insensitive (SQuAD-style)."""
    s = _LATEX_WRAPPERS.sub(r"\1", s).lower()
    s = "".join(" " if ch in string.punctuation else ch for ch in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def parse_number(s: str) -> float | None:
    s = _LATEX_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\,", "").replace("{,}", "").replace("\\!", "").replace("$", "").replace("\\%", "%")
    s = s.replace("\\left", "").replace("\\right", "").strip()
    if "=" in s:
        s = s.rsplit("=", 1)[-1]
    s = s.strip().rstrip("%").strip().rstrip(".")
    m = re.fullmatch(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        a, b = parse_number(m.group(1)), parse_number(m.group(2))
        return a / b if a is not None and b not in (None, 0) else None
    s = re.sub(r"(?<=\d)[,\s](?=\d{3}\b)", "", s)  # thousands separators
    try:
        return float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _choice_index(text: str, choices: list[str]) -> int | None:
    norm = normalize_text(text)
    letters = [LETTERS[i].lower() for i in range(len(choices))]
    options = [normalize_text(c) for c in choices]
    if norm in letters:
        return letters.index(norm)
    if norm in options:
        return options.index(norm)
    for i, (letter, option) in enumerate(zip(letters, options)):  # "B. red", "(B) red"
        if norm == f"{letter} {option}":
            return i
    return None


def answer_index(sample: Sample) -> int | None:
    """Index of the correct option; `answer` may be the option text or its letter."""
    if not sample.choices:
        return None
    options = [normalize_text(c) for c in sample.choices]
    if normalize_text(sample.answer) in options:
        return options.index(normalize_text(sample.answer))
    return _choice_index(sample.answer, sample.choices)


def answers_match(sample: Sample, predicted: str | None, rel_tol: float | None = None) -> bool:
    if predicted is None:
        return False
    if sample.answer_type == "choice" and sample.choices:
        truth = answer_index(sample)
        return truth is not None and _choice_index(predicted, sample.choices) == truth
    if sample.answer_type == "numeric":
        want, got = parse_number(sample.answer), parse_number(predicted)
        if want is None or got is None:
            return normalize_text(predicted) == normalize_text(sample.answer)
        tol = rel_tol if rel_tol is not None else sample.meta.get("rel_tol", 1e-6)
        return abs(got - want) <= tol * max(abs(want), 1e-12) or got == want
    return normalize_text(predicted) == normalize_text(sample.answer)


def verify(sample: Sample, response_text: str, rel_tol: float | None = None) -> float:
    """1.0 if the last \\boxed{} answer (after </think>) is correct, else 0.0.
    Numeric tolerance: `rel_tol`, else sample.meta["rel_tol"], else 1e-6 (relative)."""
    return 1.0 if answers_match(sample, extract_answer(response_text), rel_tol) else 0.0


# --------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """A task's generator plus the scripted-policy pieces (readers, calls, reasoning texts)."""

    name: str
    config_cls: type
    generate: Callable[..., list[Sample]]                          # (n, seed, cfg) -> samples
    read_tool_output: Callable[[Sample, "ToolResult"], str | None]  # programmatic reading of a result
    answer_without_tool: Callable[[Sample, "random.Random"], str]   # best no-tool answer (often a guess)
    wrong_call: Callable[[Sample, "random.Random"], dict]           # a plausible mistaken call
    random_call: Callable[[Sample, "random.Random"], dict]          # an uninformed call
    plan_text: Callable[[Sample], str]                              # reasoning before a call
    direct_text: Callable[[Sample], str]                            # reasoning before a direct answer
    after_text: Callable[[Sample, str | None], str]                 # reasoning after reading a result
    extras: dict[str, Any] = field(default_factory=dict)
