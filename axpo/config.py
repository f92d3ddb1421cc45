"""Typed run configuration: one small dataclass per component, loaded from YAML, overridable from the
command line with dotted keys (`rl.steps=20` or `--rl.steps 20`). Unknown keys are errors that name
the key and list the valid ones, so a typo never silently runs the default.

Every choice that `shared/design/axpo.md` marks as ours (not the paper's) is a field in `AlgoConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from axpo.models import TinyModelConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name: str = "tiny"                        # "tiny" (built-in, from a config) or a hub id / local folder
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"                    # bfloat16 on GPU for real checkpoints
    attn_implementation: str = "sdpa"         # "flash_attention_2" when flash-attn is installed
    freeze_vision: bool = False
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=lambda: ["perception", "calculation", "search"])
    train_size: int = 128                     # questions per task generated for RL
    eval_size: int = 48                       # held-out questions per task (disjoint seed)
    sft_size: int = 2000                      # demonstrations per task (made lazily, ~once each)
    seed: int = 1234
    # Per-task knobs by task name (see axpo/tasks/*.py). Default: one fixed question layout for
    # calculation (2-digit x 1-digit, 3-digit result) so the tiny CPU model can learn to copy the
    # numbers into a python call and back out of its output at fixed offsets.
    task_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"calculation": {
        "kinds": ["product"], "digits_a": [2, 2], "digits_b": [1, 1], "result_digits": 3,
        "estimate_sig_digits": 1}})
    # Demonstration mix (axpo.tasks.DemoConfig): 60% of demonstrations call a tool, 20% of those
    # calls are wrong. Fewer tool demonstrations leave too few copy examples for the tiny model.
    demo_options: dict[str, Any] = field(default_factory=lambda: {"tool_prob": 0.6, "wrong_call_prob": 0.2})
    train_file: str | None = None             # user JSONL/parquet (replaces built-in tasks when set)
    eval_file: str | None = None
    sft_file: str | None = None
    on_bad_row: str = "error"                 # "error" | "skip" (skipped rows are counted and logged)


@dataclass
class ToolsConfig:
    python_timeout_s: float = 5.0
    python_memory_mb: int = 512
    zoom_max_pixels: int = 224 * 224
    search_max_results: int = 5


@dataclass
class RolloutConfig:
    engine: str = "builtin"                   # "builtin" (CPU/GPU) | "vllm" (GPU, optional extra)
    group_size: int = 8                       # G rollouts per question
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_turn_tokens: int = 128                # tokens sampled per assistant turn (a zoom call is ~90 here)
    max_turns: int = 3                        # assistant turns (tool calls + answer)
    max_total_tokens: int = 1536              # whole trajectory budget (prompt included)
    block_size: int = 16
    max_kv_tokens: int = 262144
    mask_truncated: bool = True               # Mini-o3: trajectories that hit a limit are masked, not penalised


@dataclass
class AlgoConfig:
    axpo: bool = True                         # False = GRPO baseline (same pipeline)
    brute_force: bool = False                 # spend AXPO's extra budget on extra full rollouts instead
    cut: str = "first"                        # [choice] "first" tool call only | "every" call site
    selection: str = "window_entropy"         # [choice] | "call_entropy" | "prefix_entropy" | "random" | "lowest"
    entropy_window: int = 32                  # [choice] W
    prefixes_per_group: int = 2               # [choice]
    branches_per_prefix: int = 4              # [choice] K
    force_tool_call: bool = True              # [choice] branch starts with "<tool_call>" prefilled
    train_forced_call: bool = False           # [choice] keep the forced "<tool_call>" in the loss (as if sampled, no importance weight); default: not sampled, no loss
    max_extra_fraction: float = 0.25          # [choice] extra rollouts / base rollouts per batch
    credit: str = "soft"                      # [choice] "soft" | "subgroup" | "tree"
    tree_sqrt_weight: bool = False            # TreeRL's sqrt(leaf count) weighting in "tree" credit
    prefix_weight: str = "per_sequence"       # [choice] soft/subgroup: "per_sequence" (prefix trained in parent + K branches) | "once" (weight 1/copies per prefix token)
    brute_force_plan: str = "axpo"            # [choice] brute force's extra rollouts go to the groups AXPO's selection picks ("axpo") | "round_robin" in group order
    advantage: str = "grpo"                   # "grpo" | "dr_grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28                   # DAPO's asymmetric clip-higher
    beta: float = 0.0                         # KL coefficient (ARPO practice: 0)
    loss_agg: str = "token-mean"              # "token-mean" | "seq-mean-token-mean"
    ppo_epochs: int = 1


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 5
    grad_clip: float = 1.0


@dataclass
class StageConfig:
    steps: int = 0
    lr: float | None = None                   # overrides optim.lr for this stage
    questions_per_step: int = 8               # RL: questions per step (all ranks); SFT: demos; pretrain: sequences
    micro_batch_tokens: int = 4096            # token budget per micro-batch
    checkpoint_every: int | None = None       # overrides trainer.checkpoint_every for this stage


@dataclass
class TrainerConfig:
    seed: int = 0
    deterministic: bool = False
    output_dir: str = "runs/default"
    checkpoint_every: int = 10
    # Complete checkpoints kept (the newest ones, plus the newest SFT one, RL's reference policy);
    # 0/null keeps all. 3 leaves two older complete checkpoints for --resume to fall back to if
    # the newest is damaged, and bounds the disk use (a Qwen3-VL-8B checkpoint with AdamW state is
    # ~100 GB).
    keep_last: int | None = 3
    resume: bool = False
    init_from: str | None = None              # start RL from these weights (DCP checkpoint or HF folder); skips pretrain and SFT
    evaluate: bool = True                     # Pass@k on held-out questions after SFT and after RL
    eval_samples: int = 4                     # n samples per question for Pass@k
    log_every: int = 1
    # Steps whose loss or gradient norm is NaN/inf are skipped (weights untouched) and logged with
    # skipped=1; this many in a row stop the run with an error (0 = never stop).
    max_skipped_steps: int = 5
    tensorboard: bool = True
    wandb: bool = False
    plots: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Copy pre-training of the tiny base (axpo/pretrain.py); 0 for a real pretrained checkpoint.
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(
        steps=750, lr=1.5e-3, questions_per_step=32, checkpoint_every=250))
    sft: StageConfig = field(default_factory=lambda: StageConfig(steps=350, lr=3e-3, questions_per_step=16))
    rl: StageConfig = field(default_factory=lambda: StageConfig(steps=30, lr=2e-4, questions_per_step=8))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML or command-line value against a field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls, data: dict, where: str = ""):
    """Build `cls` from a (partial) mapping. A partial sub-mapping is merged onto that field's own
    default (e.g. `sft.steps=5` keeps the run's default `sft.lr`), not onto the sub-class's."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = _deep_merge(dataclasses.asdict(default), value)
        elif isinstance(value, dict) and isinstance(default, dict):
            value = _deep_merge(default, value)
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, key: str, raw: str) -> None:
    """Set data[a][b][c] = yaml-parsed raw for key "a.b.c" (unknown keys are caught by from_dict)."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a group")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        apply_override(data, k.lstrip("-"), v)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'command line'}: {e}") from None


def _groups_help() -> str:
    lines = ["config groups (override any field with group.field=value):"]
    for f in dataclasses.fields(Config):
        sub = typing.get_type_hints(Config)[f.name]
        fields = [g.name for g in dataclasses.fields(sub)]
        lines.append(f"  {f.name:8s} {sub.__name__}: {', '.join(fields)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, description: str = "") -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=description, epilog=_groups_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    parser.add_argument("--output-dir", default=None, help="run folder (overrides trainer.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.steps=10 algo.axpo=false")
    # Dotted flags ("--rl.steps 10", "--rl.steps=10") are overrides too; pull them out first.
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, dotted = [], []
    i = 0
    while i < len(argv):
        tok = argv[i]
        key = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        if "." in key:
            if "=" in tok:
                dotted.append(tok[2:])
            elif i + 1 < len(argv):
                dotted.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                parser.error(f"{tok} needs a value")
        else:
            rest.append(tok)
        i += 1
    args = parser.parse_args(rest)
    overrides = list(args.overrides) + dotted
    cfg = load_config(args.config, overrides)
    if args.output_dir:
        cfg.trainer.output_dir = args.output_dir
    if args.resume:
        cfg.trainer.resume = True
    return cfg, args
