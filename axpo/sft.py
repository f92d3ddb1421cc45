"""SFT on tool-use demonstrations: loss on the assistant's tokens only.

A demonstration (chat messages + images) is rendered with the processor's chat template, the same
format the agent loop produces token by token. The loss covers each assistant turn from just after
the generation header `<|im_start|>assistant\n<think>\n` through its `<|im_end|>`; system, user and
tool-response tokens (and image pads) carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axpo.agent.format import AgentFormat


@dataclass
class EncodedDemo:
    tokens: list[int]
    loss_mask: list[int]
    pixel_values: list[torch.Tensor]
    grids: list[tuple[int, int, int]]


def encode_demo(messages: list[dict], images: list, fmt: AgentFormat, tools: list[dict] | None) -> EncodedDemo:
    text = fmt.processor.apply_chat_template(messages, tools=tools or None, tokenize=False)
    chunk = fmt.encode(text, images)
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
    return EncodedDemo(ids, mask, chunk.pixel_values, chunk.grids)
