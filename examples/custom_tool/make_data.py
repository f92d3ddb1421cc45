"""Writes data/{train,eval,sft}.jsonl for the example (run from the repository root:
`python examples/custom_tool/make_data.py`); the files are committed, this shows how they were made."""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plugin import BOOK  # noqa: E402

out = Path(__file__).parent / "data"
out.mkdir(exist_ok=True)
agents = sorted(BOOK, key=lambda a: int(a[1:]))
rng = random.Random(0)


def question(agent):
    return f"What is the secret code of agent {agent}? Put the code in \\boxed{{}}."


def rows(names):
    return [{"id": f"code-{a}", "question": question(a), "answer": BOOK[a], "answer_type": "exact",
             "tools": ["codebook"]} for a in names]


train, held = agents[:32], agents[32:]
for name, data in (("train", rows(train)), ("eval", rows(held))):
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
sft = []
for a in train:
    sft.append({"id": f"demo-{a}", "tools": ["codebook"], "messages": [
        {"role": "user", "content": question(a)},
        {"role": "assistant", "reasoning_content": "I look the agent up in the codebook.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "codebook", "arguments": {"agent": a}}}]},
        {"role": "tool", "content": f"code of {a}: {BOOK[a]}"},
        {"role": "assistant", "reasoning_content": f"The codebook says {BOOK[a]}.",
         "content": f"The code is \\boxed{{{BOOK[a]}}}."}]})
(out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
print(f"wrote {out}: {len(train)} train, {len(held)} eval, {len(sft)} sft rows")
