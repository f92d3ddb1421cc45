"""SFT on tool-use demonstrations: loss on the assistant's tokens only.

A demonstration (chat messages + images) is rendered with the processor's chat template, the same
format the agent loop produces token by token. The loss covers each assistant turn from just after
the generation header `<|im_start|>assistant\n<think>\n` through its `<|im_end|>`; system, user and
tool-response tokens (and image pads) carry no loss.

Every string of a demonstration (message text, reasoning, tool-call arguments, tool responses) is
the user's data, tokenised as plain text as rollouts tokenise questions and tool output
(`AgentFormat.text_ids`): a demo whose text spells `<|im_end|>` or `<tool_call>` trains on those
characters, never on the special tokens, so it cannot end a turn or open a call the template did
not write. Only the template's own markup (and the tool schemas) become special tokens.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import torch

from axpo.agent.format import AgentFormat

# Private-use characters around a piece number: stand-ins for the user's strings while the template
# renders (never in a template; a demo that holds them is refused rather than mis-encoded).
_MARK = re.compile("\ue000axpo-(\\d+)\ue001")


@dataclass
class EncodedDemo:
    tokens: list[int]
    loss_mask: list[int]
    pixel_values: list[torch.Tensor]
    grids: list[tuple[int, int, int]]
    system_len: int | None = None   # tokens through the system turn's <|im_end|> (None: no system turn)


def _with_marks(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """A copy of `messages` whose strings are replaced by numbered marks, and the strings. The
    template trims an assistant's content and reasoning (`| trim`), so those are trimmed here; an
    empty string stays empty (the template tests it)."""
    pieces: list[str] = []

    def mark(text, trim: bool = False):
        if not isinstance(text, str):
            return text
        if "\ue000" in text or "\ue001" in text:
            raise ValueError("a demonstration's text holds U+E000/U+E001 (private-use characters AXPO "
                             "reserves for rendering)")
        text = text.strip() if trim else text
        if not text:
            return text
        pieces.append(text)
        return f"\ue000axpo-{len(pieces) - 1}\ue001"

    out = copy.deepcopy(messages)
    for m in out:
        assistant = m.get("role") == "assistant"
        if isinstance(m.get("content"), str):
            m["content"] = mark(m["content"], trim=assistant)
        elif isinstance(m.get("content"), list):
            for part in m["content"]:
                if isinstance(part, dict) and part.get("type") == "text":
                    part["text"] = mark(part.get("text", ""))
        if m.get("reasoning_content") is not None:
            m["reasoning_content"] = mark(m["reasoning_content"], trim=True)
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments", {})
            # The template's own rendering of an object (transformers' tojson), then as one piece.
            fn["arguments"] = mark(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return out, pieces


def encode_demo(messages: list[dict], images: list, fmt: AgentFormat, tools: list[dict] | None) -> EncodedDemo:
    marked, pieces = _with_marks(messages)
    text = fmt.processor.apply_chat_template(marked, tools=tools or None, tokenize=False)
    parts: list[tuple[str, bool]] = []
    pos, seen = 0, []
    for m in _MARK.finditer(text):
        parts.append((text[pos:m.start()], True))
        parts.append((pieces[int(m.group(1))], False))
        seen.append(int(m.group(1)))
        pos = m.end()
    parts.append((text[pos:], True))
    if sorted(seen) != list(range(len(pieces))):   # the template dropped or repeated a string
        raise ValueError(f"the chat template rendered {len(seen)} of the demonstration's {len(pieces)} strings; "
                         "each must appear exactly once")
    chunk = fmt.encode_parts(parts, images)
    header = fmt.tokenizer("<|im_start|>assistant\n<think>\n", add_special_tokens=False)["input_ids"]
    ids = chunk.ids
    mask = [0] * len(ids)
    i, h = 0, len(header)
    while i <= len(ids) - h:
        if ids[i:i + h] == header:
            j = i + h
            while j < len(ids) and ids[j] != fmt.im_end:
                mask[j] = 1
                j += 1
            if j < len(ids):
                mask[j] = 1  # the turn's <|im_end|>: the policy must learn to stop
            i = j
        else:
            i += 1
    # Demonstrations with the same tools open with the same system turn (the tool block, most of a
    # demo's tokens): SFT forwards it once per micro-batch (`policy.shared_prefix`).
    system_len = None
    if text.startswith("<|im_start|>system") and fmt.im_end in ids:
        system_len = ids.index(fmt.im_end) + 1
    return EncodedDemo(ids, mask, chunk.pixel_values, chunk.grids, system_len)
