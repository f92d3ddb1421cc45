"""Model and processor factory.

`tiny` builds a real `Qwen3VLForConditionalGeneration` from a config (random init, seeded) and a
real Qwen3-VL processor: the PIL image processor plus a byte-level BPE tokenizer trained locally on
a built-in corpus, with the Qwen special tokens and a Qwen3-style thinking chat template with tool
support. Nothing is downloaded, and every code path (M-RoPE, vision tokens, chat template, tool
calls) is the one a real Qwen3-VL-Thinking checkpoint takes. Any other name is a hub id or a local
folder, loaded through `AutoModelForImageTextToText` / `AutoProcessor`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch

# Qwen's special tokens, in Qwen's order. `special=True` tokens are skipped when decoding with
# skip_special_tokens; the tool/think markers are ordinary added tokens in Qwen3 (kept on decode).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]

# Qwen2/Qwen3 pre-tokenisation regex: single digits (so numbers tokenise digit by digit), words,
# punctuation runs, newlines.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

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


@dataclass
class TinyModelConfig:
    """Sizes of the built-in tiny Qwen3-VL. Defaults train at a few steps per second on 2 CPU cores."""

    vocab_size: int = 2048          # upper bound for BPE bytes + merges (the built-in corpus yields ~740)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [0])
    # Processor: images are resized to at most max_pixels (224x224 -> 7x7=49 image tokens).
    min_pixels: int = 32 * 32
    max_pixels: int = 224 * 224
    tie_word_embeddings: bool = False


def _corpus() -> list[str]:
    """A deterministic corpus for the tiny tokenizer: the text the agent actually reads and writes
    (tool schemas, built-in task questions, reasoning and answer phrases, tool calls, search
    snippets) plus generic English, numbers and JSON. Nothing is executed. Training on it about
    halves the token count of a built-in episode compared with generic text, which matters because
    CPU training cost is linear in tokens."""
    import random

    from axpo.tasks import TASKS, generate_task
    from axpo.tasks.search_facts import SearchTaskConfig, build_corpus
    from axpo.tools import TOOL_NAMES, build_tools

    lines = []
    tools = build_tools(list(TOOL_NAMES), documents=[])
    for schema in tools.schemas():
        lines.append(json.dumps(schema, ensure_ascii=False))
    lines += [f"{sn.title}: {sn.text}" for sn in build_corpus(SearchTaskConfig())[:200]]
    rng = random.Random(0)
    options = {"perception": {"image_size_min": 64, "image_size_max": 64}}
    for name, spec in TASKS.items():
        for sample in generate_task(name, 40, seed=7, options=options.get(name)):
            lines.append(sample.question)
            lines.append(f"The answer is \\boxed{{{sample.answer}}}.")
            lines.append(spec.plan_text(sample))
            lines.append(spec.direct_text(sample))
            lines.append(spec.after_text(sample, sample.answer))
            for call in (sample.oracle_call, spec.wrong_call(sample, rng)):
                if call:
                    lines.append(tool_call_json(call["name"], call["arguments"]))
    words = ("the a of to in is what which answer question image cell row column zoom colour color "
             "number result compute search query find capital city I need use tool call so then "
             "final correct wrong error because").split()
    for i in range(400):
        lines.append(" ".join(words[(i * k) % len(words)] for k in (1, 3, 7, 11, 13)) + ".")
        lines.append(f"{i} {i * 7} {i * 13 + 5} {i * 31 % 1000}")
    return lines


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    """Train once per process (about a second); callers get fresh copies from the JSON."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 2048):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_tiny_processor(cfg: TinyModelConfig | None = None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    cfg = cfg or TinyModelConfig()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2,
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
    )
    # Video is unused, but the processor class requires a video processor instance.
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor, chat_template=CHAT_TEMPLATE)


@functools.lru_cache(maxsize=1)
def _processor_class():
    """Qwen3VLProcessor, tolerant of a machine without torchvision.

    transformers 5.x type-checks the video processor against a mapping that is a dummy object when
    torchvision is absent (the CPU torch build here has no matching torchvision), so constructing
    or loading a Qwen3VLProcessor fails even though images never touch torchvision (we use the PIL
    image backend). Only that one check is relaxed; everything else is the stock processor."""
    from transformers import Qwen3VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return Qwen3VLProcessor

    class Qwen3VLProcessorNoTorchvision(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    Qwen3VLProcessorNoTorchvision.__name__ = "Qwen3VLProcessor"
    return Qwen3VLProcessorNoTorchvision


def tiny_model_config(tokenizer, cfg: TinyModelConfig | None = None):
    from transformers import Qwen3VLConfig

    cfg = cfg or TinyModelConfig()
    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    text_config = dict(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=32768,
        # M-RoPE splits head_dim/2 frequencies over (t, h, w); Qwen3-VL's [24, 20, 20] scaled down.
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": _mrope_section(cfg.head_dim), "mrope_interleaved": True},
        pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=cfg.tie_word_embeddings,
    )
    vision_config = dict(
        depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_intermediate_size, out_hidden_size=cfg.hidden_size,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        num_position_embeddings=256, deepstack_visual_indexes=list(cfg.deepstack_visual_indexes),
    )
    return Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    h = w = (half * 5) // 16
    return [half - h - w, h, w]


def build_tiny_model(seed: int = 0, cfg: TinyModelConfig | None = None, processor=None):
    from transformers import Qwen3VLForConditionalGeneration

    cfg = cfg or TinyModelConfig()
    processor = processor or build_tiny_processor(cfg)
    config = tiny_model_config(processor.tokenizer, cfg)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


def load_model_and_processor(name: str, *, seed: int = 0, tiny: TinyModelConfig | None = None,
                             dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """`name == "tiny"` builds the built-in model; otherwise a hub id or local folder (a saved tiny
    model included) is loaded through the Auto classes."""
    if name == "tiny":
        processor = build_tiny_processor(tiny)
        model = build_tiny_model(seed, tiny, processor)
        if dtype is not None:
            model = model.to(dtype)
        return model, processor
    from transformers import AutoModelForImageTextToText

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    return model, load_processor(name)


def load_processor(name: str):
    """AutoProcessor where it works. Without torchvision, transformers 5.x cannot instantiate any
    Qwen3-VL video processor, so AutoProcessor fails on every Qwen3-VL folder; we then build the same
    processor from the folder's own tokenizer, chat template and image-processor config (PIL
    backend), which is all an image-text agent uses."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name)
    video_processor = Qwen3VLVideoProcessor(
        patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
        merge_size=image_processor.merge_size)
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor,
                              chat_template=getattr(tokenizer, "chat_template", None))


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
