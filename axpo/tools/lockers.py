"""`open_locker`: reads one hidden slot of the current question (the lockers task's tool).

The slots are per-question tool state: they live in the question's `sample.meta["slots"]`, which
the agent loop hands every call through `ToolContext.sample`. The tool therefore answers the
question being rolled out and nothing else; a call outside a rollout (no sample) or for a question
without lockers is an error message to the model, never a crash.
"""

from __future__ import annotations

from axpo.tools.base import ToolContext, ToolResult, error_result, function_schema


class OpenLockerTool:
    name = "open_locker"

    def schema(self) -> dict:
        return function_schema(
            self.name,
            "Open a locker and read its letter.",
            {"locker": {"type": "integer"}},   # short: the tiny tokenizer was not trained on this text
            ["locker"],
        )

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        meta = getattr(ctx.sample, "meta", None)
        slots = meta.get("slots") if isinstance(meta, dict) else None
        if not slots:
            return error_result("no_lockers", "this question has no lockers to open.")
        k = arguments["locker"]   # validated as a 64-bit integer by the registry
        if not 1 <= k <= len(slots):
            return error_result("out_of_range", f"'locker' must be between 1 and {len(slots)}, got {k}.")
        # "{C}": the letter as the same tokens the answer "\\boxed{C}" uses (" C" is another token
        # in the tiny tokenizer, and mapping one to the other was a copy the tiny model missed).
        return ToolResult(text=f"Locker {k} holds {{{slots[k - 1]}}}.")
