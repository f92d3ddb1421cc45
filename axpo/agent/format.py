"""The Qwen3-VL agent format as token chunks.

The agent loop never re-renders history with the chat template: it tokenises only the new pieces
(the prompt once, then each tool response) and appends them to the ids the policy produced. Every
piece starts and ends at a special token, so the concatenation tokenises exactly like the chat
template's rendering of the same conversation (tests/test_agent_format.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axpo.models import special_token_ids

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class Chunk:
    ids: list[int]
    pixel_values: list[torch.Tensor]        # one tensor per image in the chunk
    grids: list[tuple[int, int, int]]
    pad_spans: list[tuple[int, int]]        # [start, end) of each image's pad run, relative to the chunk


class AgentFormat:
    """Token ids and chunk builders for one processor."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        ids = special_token_ids(self.tokenizer)
        self.ids = ids
        self.im_start = ids["<|im_start|>"]
        self.im_end = ids["<|im_end|>"]
        self.tool_call = ids["<tool_call>"]
        self.tool_call_end = ids["</tool_call>"]
        self.think_end = ids["</think>"]
        self.image_pad = ids["<|image_pad|>"]
        self.pad = self.tokenizer.pad_token_id
        self.merge_size = getattr(processor.image_processor, "merge_size", 2)
        # Generation stops after a tool call closes or the turn ends.
        self.stop_ids = (self.tool_call_end, self.im_end)
        # Vision placeholders come only from images the loop inserts, never from sampling.
        self.banned_ids = tuple(ids[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                 "<|vision_end|>", "<|vision_pad|>") if t in ids)

    # -- chunks -------------------------------------------------------------------------------

    def encode(self, text: str, images: list | None = None) -> Chunk:
        """Tokenise text whose images appear as IMAGE_PLACEHOLDER; the processor expands each image's
        pad run to the grid size and returns its pixels."""
        images = list(images or [])
        if text.count(IMAGE_PLACEHOLDER) != len(images):
            raise ValueError(f"{text.count(IMAGE_PLACEHOLDER)} image placeholders for {len(images)} images")
        if images:
            out = self.processor(text=[text], images=images, return_tensors="pt")
            ids = out["input_ids"][0].tolist()
            grid = out["image_grid_thw"]
            rows = grid.prod(-1).tolist()
            pixel_values = list(torch.split(out["pixel_values"], rows))
            grids = [tuple(int(v) for v in g) for g in grid.tolist()]
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            pixel_values, grids = [], []
        spans, i = [], 0
        while i < len(ids):
            if ids[i] == self.image_pad:
                j = i
                while j < len(ids) and ids[j] == self.image_pad:
                    j += 1
                spans.append((i, j))
                i = j
            else:
                i += 1
        if len(spans) != len(grids):
            raise ValueError("adjacent images: pad runs cannot be told apart")
        return Chunk(ids, pixel_values, grids, spans)

    def prompt(self, question: str, images: list, tools: list[dict] | None, system: str | None = None) -> Chunk:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}]
        text = self.processor.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        return self.encode(text, images)

    def tool_response(self, text: str, images: list, *, closes_turn: bool = True) -> Chunk:
        """What follows a sampled `</tool_call>`: end the assistant turn, the tool's answer as a user
        turn, and the next assistant turn opened inside <think>."""
        body = "".join(IMAGE_PLACEHOLDER for _ in images) + text
        s = ("<|im_end|>\n" if closes_turn else "") + "<|im_start|>user\n<tool_response>\n" + body + \
            "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
        return self.encode(s, images)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def call_text(self, turn_ids: list[int]) -> tuple[int | None, str]:
        """Locate the last <tool_call> of a turn that ended with </tool_call>; return its index in
        the turn and the text between the tags (a missing opening tag gives (None, text))."""
        end = len(turn_ids) - 1 if turn_ids and turn_ids[-1] == self.tool_call_end else len(turn_ids)
        for i in range(end - 1, -1, -1):
            if turn_ids[i] == self.tool_call:
                return i, self.decode(turn_ids[i + 1:end])
        return None, self.decode(turn_ids[:end])
