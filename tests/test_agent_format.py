"""The agent loop builds conversations chunk by chunk (prompt, sampled turn, tool response, ...); SFT
renders demonstrations with the chat template. Both must give the same tokens, or SFT would teach a
format the loop never produces."""

import numpy as np
import torch
from PIL import Image

from axpo.agent.format import AgentFormat
from axpo.models import tool_call_json
from axpo.sft import encode_demo

TOOLS = [{"type": "function", "function": {"name": "image_zoom_in", "description": "zoom",
                                           "parameters": {"type": "object", "properties": {}}}}]


def _img(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_loop_chunks_equal_chat_template(tiny_processor):
    fmt = AgentFormat(tiny_processor)
    q_img, crop = _img(500, 400, 0), _img(128, 96, 1)
    args = {"bbox_2d": [100, 200, 300, 400], "label": "cell", "img_idx": 0}
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is the dot?"}]},
        {"role": "assistant", "reasoning_content": "Too small, zoom in.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "image_zoom_in", "arguments": args}}]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed on cell."}]},
        {"role": "assistant", "reasoning_content": "It is red.", "content": "The answer is \\boxed{red}."},
    ]
    demo = encode_demo(messages, [q_img, crop], fmt, TOOLS)

    tok = lambda s: fmt.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = fmt.prompt("Which colour is the dot?", [q_img], TOOLS)
    turn1 = tok("Too small, zoom in.\n</think>\n\n<tool_call>\n" + tool_call_json("image_zoom_in", args)
                + "\n</tool_call>")
    resp = fmt.tool_response("Zoomed on cell.", [crop])
    turn2 = tok("It is red.\n</think>\n\nThe answer is \\boxed{red}.<|im_end|>")
    loop_ids = prompt.ids + turn1 + resp.ids + turn2
    assert demo.tokens[:len(loop_ids)] == loop_ids
    assert demo.tokens[len(loop_ids):] == tok("\n")

    # Pixels agree too, image by image.
    pv = torch.cat(prompt.pixel_values + resp.pixel_values)
    assert torch.equal(torch.cat(demo.pixel_values), pv)
    assert demo.grids == prompt.grids + resp.grids

    # Loss covers exactly the two sampled turns (the forced <|im_end|> after </tool_call> is inside
    # the first assistant turn in the template and carries loss there too).
    n_loss = sum(demo.loss_mask)
    assert n_loss == len(turn1) + 1 + len(turn2)
    # Stop tokens are single ids that the loop watches for.
    assert turn1[-1] == fmt.tool_call_end and turn2[-1] == fmt.im_end


def test_plain_text_path_tokenises_ordinary_text_like_the_template(tiny_processor):
    """Tool text and questions are tokenised as untrusted plain text (tests/test_hostile_text.py);
    for ordinary text that must give exactly the ids of the rendered template string, or the loop
    would drift from what SFT teaches."""
    from axpo.agent.format import IMAGE_PLACEHOLDER

    fmt = AgentFormat(tiny_processor)
    imgs = [_img(128, 96, 1), _img(64, 64, 2)]
    for text in ["Zoomed on cell.", "", "\n\nleading newlines", "  spaces  ", "a\nb\n", "x = 3 < 4 > 2 | 1"]:
        for k in range(3):
            for closes in (True, False):
                s = ("<|im_end|>\n" if closes else "") + "<|im_start|>user\n<tool_response>\n" + \
                    IMAGE_PLACEHOLDER * k + text + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
                want, got = fmt.encode(s, imgs[:k]), fmt.tool_response(text, imgs[:k], closes_turn=closes)
                assert got.ids == want.ids and got.pad_spans == want.pad_spans and got.grids == want.grids
                assert all(torch.equal(a, b) for a, b in zip(got.pixel_values, want.pixel_values))
            for tools in (None, TOOLS):
                messages = [{"role": "user", "content": [{"type": "image"}] * k + [{"type": "text", "text": text}]}]
                s = fmt.processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
                want, got = fmt.encode(s, imgs[:k]), fmt.prompt(text, imgs[:k], tools)
                assert got.ids == want.ids and got.pad_spans == want.pad_spans
