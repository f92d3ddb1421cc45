"""Exact multi-digit arithmetic: easy with the `python` tool, guesswork for a small model without.

Questions are text only ("What is 4837 * 296 + 75 * 318?"); the answer is checked numerically
(relative tolerance 1e-6), so an approximate estimate scores 0.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from axpo.tasks.base import ANSWER_INSTRUCTION, Sample, TaskSpec
from axpo.tools.base import ToolResult


@dataclass
class CalculationConfig:
    kinds: list[str] = field(default_factory=lambda: ["product", "sum_of_products", "product_minus"])
    digits_a: tuple[int, int] = (3, 4)     # digits of the first factor (inclusive range)
    digits_b: tuple[int, int] = (2, 3)     # digits of the other factors and terms
    estimate_sig_digits: int = 2           # the no-tool reader's mental-arithmetic precision
    # Keep only questions whose result has this many digits (None: any). With one kind and fixed
    # operand digits every question has the same token layout, which a tiny model needs: it can
    # learn to copy at fixed offsets long before it learns content-based (induction) copying.
    result_digits: int | None = None
    tools: list[str] = field(default_factory=lambda: ["python"])


def _num(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _expression(kind: str, rng: random.Random, cfg: CalculationConfig) -> str:
    a, b = _num(rng, cfg.digits_a), _num(rng, cfg.digits_b)
    if kind == "product":
        return f"{a} * {b}"
    if kind == "sum_of_products":
        return f"{a} * {b} + {_num(rng, cfg.digits_b)} * {_num(rng, cfg.digits_b)}"
    if kind == "product_minus":
        return f"{a} * {b} - {_num(rng, cfg.digits_a)}"
    raise ValueError(f"unknown calculation kind {kind!r}; known: product, sum_of_products, product_minus")


def _evaluate(expr: str) -> int:
    # Only digits, spaces and + - * (built by _expression): eval is exact integer arithmetic here.
    if not re.fullmatch(r"[\d\s+\-*]+", expr):
        raise ValueError(expr)
    return int(eval(expr, {"__builtins__": {}}))


def generate(n: int, seed: int, cfg: CalculationConfig | None = None, start: int = 0) -> list[Sample]:
    cfg = cfg or CalculationConfig()
    samples = []
    for i in range(start, start + n):  # sample i depends only on (seed, i)
        rng = random.Random(f"calculation-{seed}-{i}")
        kind = rng.choice(cfg.kinds)
        expr = _expression(kind, rng, cfg)
        for _ in range(1000):  # rejection sampling, still a function of (seed, i) only
            if cfg.result_digits is None or len(str(abs(_evaluate(expr)))) == cfg.result_digits:
                break
            expr = _expression(kind, rng, cfg)
        else:
            raise ValueError(f"calculation: no {kind!r} question with {cfg.result_digits}-digit result "
                             f"for digits_a={cfg.digits_a}, digits_b={cfg.digits_b}")
        samples.append(Sample(
            uid=f"calculation-{seed}-{i}", task="calculation",
            question=f"What is {expr}? {ANSWER_INSTRUCTION}", images=[], answer=str(_evaluate(expr)),
            answer_type="numeric", tools=list(cfg.tools),
            oracle_call={"name": "python", "arguments": {"code": f"print({expr})"}},
            # rel_tol 0: the default 1e-6 would accept off-by-one on 7-digit results.
            meta={"expression": expr, "kind": kind, "estimate_sig_digits": cfg.estimate_sig_digits, "rel_tol": 0.0},
        ))
    return samples


# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_tool_output(sample: Sample, result: ToolResult) -> str | None:
    """The last number the code printed."""
    if result.error:
        return None
    found = _NUMBER.findall(result.text)
    return found[-1] if found else None


def _round_sig(x: int, sig: int) -> int:
    if x == 0:
        return 0
    digits = len(str(abs(x)))
    return round(x, -(digits - sig))


def answer_without_tool(sample: Sample, rng: random.Random) -> str:
    """Mental arithmetic at a few significant digits: every number rounded, then computed."""
    sig = sample.meta.get("estimate_sig_digits", 2)
    rounded = re.sub(r"\d+", lambda m: str(_round_sig(int(m.group()), sig)), sample.meta["expression"])
    return str(_evaluate(rounded))


def _perturb_digit(expr: str, rng: random.Random) -> str:
    numbers = list(re.finditer(r"\d+", expr))
    m = rng.choice(numbers)
    s = m.group()
    pos = rng.randrange(len(s))
    new_digit = rng.choice([d for d in "0123456789" if d != s[pos] and not (pos == 0 and d == "0")])
    return expr[: m.start()] + s[:pos] + new_digit + s[pos + 1:] + expr[m.end():]


def wrong_call(sample: Sample, rng: random.Random) -> dict:
    """A mistyped number, or + and * confused."""
    expr = sample.meta["expression"]
    if rng.random() < 0.7 or "+" not in expr:
        wrong = _perturb_digit(expr, rng)
    else:
        wrong = expr.replace("+", "#").replace("*", "+").replace("#", "*")
    return {"name": "python", "arguments": {"code": f"print({wrong})"}}


def random_call(sample: Sample, rng: random.Random) -> dict:
    """Arithmetic of the same shape on numbers unrelated to the question."""
    expr = re.sub(r"\d+", lambda m: str(rng.randint(10 ** (len(m.group()) - 1), 10 ** len(m.group()) - 1)),
                  sample.meta["expression"])
    return {"name": "python", "arguments": {"code": f"print({expr})"}}


def plan_text(sample: Sample) -> str:
    return "This needs exact arithmetic. I will compute it with Python."


def direct_text(sample: Sample) -> str:
    return "I will estimate the result."


def after_text(sample: Sample, reading: str | None) -> str:
    if reading is None:
        return "The code did not print a result. I will estimate."
    return f"The code printed {reading}."


SPEC = TaskSpec("calculation", CalculationConfig, generate, read_tool_output, answer_without_tool,
                wrong_call, random_call, plan_text, direct_text, after_text)
