"""The built-in tiny Qwen3-VL: a real `Qwen3VLForConditionalGeneration` from a config (random init,
seeded) and a real Qwen3-VL processor: the PIL image processor plus a byte-level BPE tokenizer
trained locally on a built-in corpus (the text the agent reads and writes), with the Qwen special
tokens and the chat template of axpo/chat_format.py. Nothing is downloaded, and every code path
(M-RoPE, vision tokens, chat template, tool calls) is the one a real Qwen3-VL-Thinking checkpoint
takes."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch

from axpo.chat_format import ADDED_TOKENS, CHAT_TEMPLATE, SPECIAL_TOKENS, tool_call_json

# Qwen2/Qwen3 pre-tokenisation regex: single digits (so numbers tokenise digit by digit), words,
# punctuation runs, newlines.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
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

    from axpo.tasks import BUILTIN_TASKS, TASKS, generate_task
    from axpo.tasks.search_facts import SearchTaskConfig, build_corpus
    from axpo.tools import TOOL_NAMES, build_tools

    lines = []
    tools = build_tools(list(TOOL_NAMES), documents=[])   # the built-in tools only, for the same reason
    for schema in tools.schemas():
        lines.append(json.dumps(schema, ensure_ascii=False))
    lines += [f"{sn.title}: {sn.text}" for sn in build_corpus(SearchTaskConfig())[:200]]
    rng = random.Random(0)
    options = {"perception": {"image_size_min": 64, "image_size_max": 64}}
    # Built-in tasks only: a plugin's task must not change the tokenizer of the built-in model.
    for name in BUILTIN_TASKS:
        spec = TASKS[name]
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
    return processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor, chat_template=CHAT_TEMPLATE)


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


@functools.lru_cache(maxsize=1)
def processor_class():
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


