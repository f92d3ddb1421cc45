"""A user tool and a user reward, registered with AXPO's public API.

`codebook` looks up an agent's secret code (per-question state travels in the question row's
`meta`-free form here: the book is fixed, as a company directory would be). The reward gives 1.0
for the right code in \\boxed{}, 0.2 for the right code anywhere in the answer, else 0.
"""

import re

import axpo
from axpo.tasks import extract_answer

BOOK = {f"K{i}": f"{(i * 37 + 11) % 100:02d}" for i in range(1, 41)}


@axpo.register_tool("codebook")
class Codebook:
    name = "codebook"

    def schema(self):
        return axpo.function_schema(
            "codebook", "Look up the secret code of an agent.",
            {"agent": {"type": "string", "description": "agent id, e.g. K7"}}, ["agent"])

    def __call__(self, arguments, ctx):
        agent = arguments["agent"].strip()
        if agent not in BOOK:
            # A bad argument is an error message the policy reads, never an exception.
            return axpo.error_result("not_found", f"no agent {agent[:20]!r} in the codebook")
        return axpo.ToolResult(text=f"code of {agent}: {BOOK[agent]}")


@axpo.register_reward("code_match")
def code_match(sample, traj) -> float:
    if not traj.finished:
        return 0.0
    text = traj.final_text or ""
    if extract_answer(text) == sample.answer:
        return 1.0
    return 0.2 if re.search(rf"\b{re.escape(sample.answer)}\b", text) else 0.0
