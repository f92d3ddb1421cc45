"""The chat format: Qwen's special and added tokens, the Qwen3-VL-Thinking chat template with tools,
and the exact tool-call JSON the template renders. Shared by the tiny tokenizer (axpo/tiny.py),
the agent's token-level format (axpo/agent/format.py) and the SFT encoder; imports nothing of the
project, so anything may import it."""

from __future__ import annotations

import json

# Qwen's special tokens, in Qwen's order. `special=True` tokens are skipped when decoding with
# skip_special_tokens; the tool/think markers are ordinary added tokens in Qwen3 (kept on decode).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]

# Qwen3-VL-Thinking style chat template with tools. The generation prompt opens the think block,
# so sampled text starts inside <think>. Consecutive tool messages form one user turn of
# <tool_response> blocks. The agent loop builds exactly these strings token by token, and
# tests/test_chat_format.py checks that the two agree.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' -%}{{ render(messages[0].content) + '\n\n' }}{%- endif -%}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\n' + (tool | tojson) }}{%- endfor -%}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{ '<|im_start|>system\n' + render(messages[0].content) + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{ '<|im_start|>user\n' + render(message.content) + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- set body = render(message.content or '') | trim -%}"
    "{{ '<|im_start|>assistant\n<think>\n' + ((message.reasoning_content or '') | trim)"
    " + '\n</think>\n\n' + body }}"
    "{%- for tc in (message.tool_calls or []) -%}"
    "{%- set f = tc.function if tc.function is defined else tc -%}"
    "{%- if body or not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{{ '<tool_call>\n{\"name\": \"' + f.name + '\", \"arguments\": '"
    " + (f.arguments if f.arguments is string else (f.arguments | tojson)) + '}\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\n<tool_response>\n' + render(message.content) + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{ '<|im_end|>\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n<think>\n' }}{%- endif -%}"
)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Special/added token ids read from the tokenizer at run time (never hard-coded)."""
    out = {}
    for t in SPECIAL_TOKENS + ADDED_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            continue
        out[t] = i
    return out


def tool_call_json(name: str, arguments: dict) -> str:
    """The exact JSON text the chat template renders inside <tool_call> tags."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
