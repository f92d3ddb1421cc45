"""The Qwen3-VL agent format as token chunks.

The agent loop never re-renders history with the chat template: it tokenises only the new pieces
(the prompt once, then each tool response) and appends them to the ids the policy produced. Every
piece starts and ends at a special token, so the concatenation tokenises exactly like the chat
template's rendering of the same conversation (tests/test_agent_format.py checks this).

Untrusted text (what a tool returns, which may quote the model's own call; the question of a data
row) is tokenised as plain text (`text_ids`): a special- or added-token spelling in it such as
`<|image_pad|>` or `<|im_end|>` becomes ordinary tokens, never the special token, and invalid
Unicode (lone surrogates) becomes U+FFFD. So the only special tokens of a chunk are the template's,
and image pads come only from the images passed in. Decoding never raises on any id sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from axpo.models import special_token_ids

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_SENTINEL = "\ue000axpo-untrusted-text\ue001"  # private-use characters: never in a template


def clean_text(text: str) -> str:
    """`text` as valid Unicode: lone surrogates become U+FFFD (a valid surrogate pair becomes its
    character). Strings from JSON escapes ("\\ud800") or bytes decoded with surrogateescape can
    hold them; the tokenizer raises on them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


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
        # The tokens that open or fill an image: a shared training prefix ends before the first.
        self.vision_ids = frozenset(ids[t] for t in ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>")
                                    if t in ids)
        # Every string the tokenizer would turn into an added (special or not) token, and their ids.
        added = dict(self.tokenizer.get_added_vocab())
        added.update(ids)
        added.update(zip(self.tokenizer.all_special_tokens, self.tokenizer.all_special_ids))
        self.added_ids = frozenset(i for i in added.values() if i is not None)
        alternatives = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True) if t) or "(?!)"
        self._added_at = re.compile(f"(?=(?:{alternatives}))", re.DOTALL)   # every start, overlaps too
        self._added_tok = re.compile(alternatives, re.DOTALL)
        self._replacement_ids = self._plain_ids("\ufffd")

    # -- chunks -------------------------------------------------------------------------------

    def encode(self, text: str, images: list | None = None) -> Chunk:
        """Tokenise trusted text (the template's own) whose images appear as IMAGE_PLACEHOLDER; the
        processor expands each image's pad run to the grid size and returns its pixels. Special-token
        spellings in `text` ARE special tokens: untrusted text goes through `text_ids`."""
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

    def encode_untrusted(self, before: str, untrusted: str, after: str, images: list | None = None) -> Chunk:
        """Trusted `before` (holding every image placeholder) + untrusted text + trusted `after`.
        The untrusted text is widened to the neighbouring added tokens of the trusted text (the
        tokenizer splits there too), so that for text without special-token spellings the ids are
        exactly those of `encode(before + untrusted + after)`."""
        cut_lo = max((m.end() for m in self._added_tok.finditer(before)), default=0)
        m = self._added_tok.search(after)
        cut_hi = m.start() if m else len(after)
        head = self.encode(before[:cut_lo], images)
        middle = self.text_ids(before[cut_lo:] + clean_text(untrusted) + after[:cut_hi])
        tail = self.encode(after[cut_hi:]) if after[cut_hi:] else Chunk([], [], [], [])
        ids = head.ids + middle + tail.ids
        if tail.grids or self.image_pad in middle:  # cannot happen: text_ids emits no added token
            raise AssertionError("image pads outside the trusted head")
        return Chunk(ids, head.pixel_values, head.grids, head.pad_spans)

    def encode_parts(self, parts: list[tuple[str, bool]], images: list | None = None) -> Chunk:
        """`encode_untrusted` for any number of untrusted pieces: `parts` is the rendered text in
        order as (text, trusted); every image placeholder must be in trusted text. The text between
        two added tokens of the trusted text is tokenised as plain text (`text_ids`) when it holds
        any untrusted character, else as trusted text, so ordinary text gives exactly the ids of
        `encode("".join(texts))` (the tokenizer splits at added tokens too)."""
        images = list(images or [])
        # Cut points: the [start, end) of every added-token spelling inside one trusted part.
        pieces: list[tuple[str, bool]] = []   # (text, plain) between and at the cuts
        run, run_plain = "", False
        for text, trusted in parts:
            if not text:
                continue
            if not trusted:
                run, run_plain = run + text, True
                continue
            pos = 0
            for m in self._added_tok.finditer(text):
                run += text[pos:m.start()]
                pieces.append((run, run_plain))
                pieces.append((m.group(), False))
                run, run_plain, pos = "", False, m.end()
            run += text[pos:]
        pieces.append((run, run_plain))
        ids: list[int] = []
        pixel_values, grids, spans = [], [], []
        trusted_run = ""
        n_img = 0

        def flush() -> None:
            nonlocal trusted_run, n_img
            if trusted_run:
                k = trusted_run.count(IMAGE_PLACEHOLDER)
                c = self.encode(trusted_run, images[n_img:n_img + k])
                spans.extend((len(ids) + s, len(ids) + e) for s, e in c.pad_spans)
                ids.extend(c.ids)
                pixel_values.extend(c.pixel_values)
                grids.extend(c.grids)
                n_img += k
            trusted_run = ""

        for text, plain in pieces:
            if plain:
                flush()
                ids.extend(self.text_ids(text))
            else:
                trusted_run += text
        flush()
        if n_img != len(images):
            raise ValueError(f"{n_img} image placeholders in trusted text for {len(images)} images")
        return Chunk(ids, pixel_values, grids, spans)

    def prompt(self, question: str, images: list, tools: list[dict] | None, system: str | None = None) -> Chunk:
        """The rendered chat template up to the assistant's generation prompt. The question is
        untrusted text: its images come from `images` only."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": _SENTINEL}]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}]
        text = self.processor.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        if text.count(_SENTINEL) != 1:
            raise ValueError("prompt: the system prompt or tool schemas contain the question sentinel")
        before, after = text.split(_SENTINEL)
        return self.encode_untrusted(before, question, after, images)

    def tool_response(self, text: str, images: list, *, closes_turn: bool = True) -> Chunk:
        """What follows a sampled `</tool_call>`: end the assistant turn, the tool's answer as a user
        turn, and the next assistant turn opened inside <think>. `text` is untrusted (a tool's
        output can quote anything the model wrote): see `text_ids`."""
        head = ("<|im_end|>\n" if closes_turn else "") + "<|im_start|>user\n<tool_response>\n" + \
            "".join(IMAGE_PLACEHOLDER for _ in images)
        tail = "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
        return self.encode_untrusted(head, text, tail, images)

    # -- untrusted text -------------------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        """Token ids of untrusted text as plain text: no id is an added or special token (so no image
        pad, no turn marker, no tool-call tag). Invalid Unicode becomes U+FFFD.

        The tokenizer matches added-token spellings anywhere in its input, and for added tokens that
        are not `special` (Qwen's <tool_call>, <think>, ...) `split_special_tokens` does not stop it.
        So the text is cut one character into every spelling of an added token and the pieces are
        tokenised separately: each piece decodes to its own characters, the concatenation to the text.
        Ordinary text (no such spelling) is one piece, tokenised exactly as the tokenizer would."""
        text = clean_text(text)
        if not text:
            return []
        cuts = sorted({m.start() + 1 for m in self._added_at.finditer(text)})
        ids: list[int] = []
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            ids += self._plain_ids(text[a:b])
        return ids

    def _plain_ids(self, piece: str) -> list[int]:
        ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        if self.added_ids.isdisjoint(ids):
            return ids
        # A normaliser can still assemble an added token from a piece: go character by character,
        # and a character that alone maps onto an added token becomes U+FFFD.
        out: list[int] = []
        for ch in piece:
            c = self.tokenizer(ch, add_special_tokens=False)["input_ids"]
            out += c if self.added_ids.isdisjoint(c) else self._replacement_ids
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of any id sequence (the model's own turn): never raises. An id the tokenizer cannot
        decode (out of its vocabulary, negative) reads as U+FFFD."""
        ids = list(ids)
        try:
            return clean_text(self.tokenizer.decode(ids, skip_special_tokens=False))
        except Exception:  # noqa: BLE001 - one bad id must not lose the whole turn
            pass
        parts = []
        for i in ids:
            try:
                parts.append(self.tokenizer.decode([i], skip_special_tokens=False))
            except Exception:  # noqa: BLE001
                parts.append("\ufffd")
        return clean_text("".join(parts))

    def call_text(self, turn_ids: list[int]) -> tuple[int | None, str]:
        """Locate the last <tool_call> of a turn that ended with </tool_call>; return its index in
        the turn and the text between the tags (a missing opening tag gives (None, text))."""
        end = len(turn_ids) - 1 if turn_ids and turn_ids[-1] == self.tool_call_end else len(turn_ids)
        for i in range(end - 1, -1, -1):
            if turn_ids[i] == self.tool_call:
                return i, self.decode(turn_ids[i + 1:end])
        return None, self.decode(turn_ids[:end])
