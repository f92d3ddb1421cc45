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
from typing import Any, Literal

import yaml

from axpo.tiny import TinyModelConfig


class ConfigError(ValueError):
    """A bad config value; `field` is its dotted path where known (so the loader can say whether it
    came from the YAML file or the command line)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class ModelConfig:
    name: str = "tiny"                        # "tiny" (built-in, from a config) or a hub id / local folder
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # Starting weights of the built-in tiny model: "copy", the shipped copy-pretrained text weights
    # (axpo/copy_base.py; default tiny sizes only), or "random" (seed init: set pretrain.steps, e.g.
    # 3000, so that tool calls can copy values at all). Ignored for other models.
    tiny_base: Literal["copy", "random"] = "copy"
    # Compute dtype. bfloat16/float16 train with fp32 master weights (FSDP2 mixed precision).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"         # "flash_attention_2" when flash-attn is installed
    freeze_vision: bool = False
    activation_checkpointing: bool = False
    # The trained policy's text MLPs and RMSNorms save fewer activations for backward (same values,
    # recomputed in backward; axpo/lean_activations.py). Off: Hugging Face's forwards.
    lean_activations: bool = True


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
    on_bad_row: Literal["error", "skip"] = "error"   # skipped rows are counted and logged
    reward: str = "verify"                    # a registered reward (axpo.register_reward); "verify": the task's answer check


@dataclass
class ToolsConfig:
    # The tools a question row without a "tools" key is offered (and the ones built for the run);
    # any registered name (axpo.register_tool).
    enabled: list[str] = field(default_factory=lambda: ["image_zoom_in", "python", "search"])
    python_timeout_s: float = 5.0
    python_memory_mb: int = 512
    zoom_max_pixels: int = 224 * 224
    search_max_results: int = 5


@dataclass
class RolloutConfig:
    engine: Literal["builtin", "vllm"] = "builtin"   # vllm: the optional extra (see README)
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
    # vLLM backend (engine=vllm, the optional extra; axpo/rollout/vllm_engine.py). One in-process
    # engine per rank, colocated with training.
    vllm_dtype: Literal["model", "float32", "bfloat16", "float16"] = "model"   # "model": model.dtype
    vllm_max_model_len: int | None = None     # context limit; None: max_total_tokens + max_turn_tokens
    vllm_kv_cache_gib: float | None = 1.0     # KV cache size (CPU and GPU); None: gpu_memory_utilization decides
    vllm_gpu_memory_utilization: float = 0.5  # GPU share vLLM may take (weights + KV) when vllm_kv_cache_gib is None
    vllm_seed: int | None = None              # engine seed; None: trainer.seed + rank (rows carry their own seeds)
    # Truncated importance sampling (verl/TRL "TIS") for the train/rollout mismatch: each sampled
    # token's advantage is scaled by min(exp(trainer logp - engine logp), tis_cap). 0: off.
    tis_cap: float = 0.0
    # Free the engine's weights (vLLM on GPU: sleep) during the policy update; the next sync
    # restores them. Saves a full weight copy per rank at the cost of reallocating it every step.
    release_weights_during_update: bool = False


@dataclass
class AlgoConfig:
    axpo: bool = True                         # False = GRPO baseline (same pipeline)
    brute_force: bool = False                 # spend AXPO's extra budget on extra full rollouts instead
    cut: Literal["first", "every"] = "first"  # [choice] first tool call only | every call site
    selection: Literal["window_entropy", "call_entropy", "prefix_entropy", "random", "lowest"] = "window_entropy"  # [choice]
    entropy_window: int = 32                  # [choice] W
    prefixes_per_group: int = 2               # [choice]
    branches_per_prefix: int = 4              # [choice] K
    force_tool_call: bool = True              # [choice] branch starts with "<tool_call>" prefilled
    train_forced_call: bool = False           # [choice] keep the forced "<tool_call>" in the loss (as if sampled, no importance weight); default: not sampled, no loss
    max_extra_fraction: float = 0.25          # [choice] extra rollouts / base rollouts per batch
    credit: Literal["soft", "subgroup", "tree"] = "soft"   # [choice]
    tree_sqrt_weight: bool = False            # TreeRL's sqrt(leaf count) weighting in "tree" credit
    prefix_weight: Literal["per_sequence", "once"] = "per_sequence"  # [choice] soft/subgroup: "per_sequence" (prefix trained in parent + K branches) | "once" (weight 1/copies per prefix token)
    brute_force_plan: Literal["axpo", "round_robin"] = "axpo"  # [choice] brute force's extra rollouts go to the groups AXPO's selection picks ("axpo") | "round_robin" in group order
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28                   # DAPO's asymmetric clip-higher
    beta: float = 0.0                         # KL coefficient (ARPO practice: 0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
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
    init_from: str | None = None              # start from these weights (DCP checkpoint or HF folder) at `init_stage`, skipping the stages before it
    # The stage `init_from` starts: "rl", or "sft" (SFT from pre-trained weights: the lockers
    # comparison pre-trains once and runs SFT per argument skill from that checkpoint).
    init_stage: Literal["sft", "rl"] = "rl"
    evaluate: bool = True                     # Pass@k on held-out questions after SFT and after RL
    eval_samples: int = 4                     # n samples per question for Pass@k
    # The "after_sft" evaluation. Off for RL runs that start from an SFT checkpoint evaluated once
    # already (benchmarks/axpo_vs_grpo.py starts dozens from one).
    eval_after_sft: bool = True
    # Also evaluate every this many RL steps (0: only after SFT and after RL); the numbers go into
    # that step's metrics row as eval/<name> and into evals.json as rl_step_<n>.
    eval_every: int = 0
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
    # Copy pre-training (axpo/pretrain.py): 0 for the shipped copy-pretrained base (model.tiny_base
    # copy) and for real pretrained checkpoints; about 3000 steps make a random tiny base copy.
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(
        steps=0, lr=1.5e-3, questions_per_step=32, checkpoint_every=250))
    sft: StageConfig = field(default_factory=lambda: StageConfig(steps=350, lr=3e-3, questions_per_step=16))
    rl: StageConfig = field(default_factory=lambda: StageConfig(steps=30, lr=2e-4, questions_per_step=8))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Modules (my_pkg.tools) or .py files (relative to the config file) imported before the config
    # is checked: where user tools, rewards and tasks register (axpo/registry.py).
    plugins: list[str] = field(default_factory=list)


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
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
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
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}",
            field=f"{prefix}{unknown[0]!s}")
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = _deep_merge(dataclasses.asdict(default), value)
        elif isinstance(value, dict) and isinstance(default, dict):
            value = _deep_merge(default, value)
        path = f"{where}.{name}" if where else name
        try:
            kwargs[name] = _coerce(value, hints[name], path)
        except ConfigError as e:
            if e.field is None:
                e.field = path
            raise
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


def _flat_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _flat_keys(v, key + ".")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, check: bool = True) -> Config:
    """The run config: defaults <- the YAML file <- the command-line overrides, then checked
    (types and choices while reading; ranges, cross-field rules, data files and registered names
    after: axpo/config_checks.py). Every error names its field and where the value came from."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    cli: set[str] = set()
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"command line: override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        k = k.lstrip("-")
        try:
            apply_override(data, k, v)
        except yaml.YAMLError as e:
            raise ConfigError(f"command line: {k}={v}: not a valid value ({e.problem})") from None
        cli.add(k)

    def source(field: str | None) -> str:
        if field is None:
            return str(path or "command line")
        field = field.split("[", 1)[0]
        parts = field.split(".")
        if any(".".join(parts[:i]) in cli for i in range(1, len(parts) + 1)):
            return "command line"
        return str(path) if path is not None else "command line"

    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source(e.field)}: {e}", field=e.field) from None
    if check:
        base = path.parent if path is not None else None
        errors = [(f, msg) for f, msg in check_all(cfg, base)]
        if errors:
            lines = [f"{source(f)}: {msg}" for f, msg in errors]
            raise ConfigError(lines[0] if len(lines) == 1 else
                              f"{len(lines)} config errors:\n  " + "\n  ".join(lines), field=errors[0][0])
    return cfg


def check_all(cfg: Config, base: Path | None = None) -> list[tuple[str, str]]:
    """(field, message) for every rule, data file and registered name that fails. Imports the
    config's plugins first, so their tools, rewards and tasks count as registered."""
    from axpo.config_checks import check_config

    out = [(m.split(" = ", 1)[0], m) for m in check_config(cfg)]
    try:
        from axpo.registry import import_plugins

        import_plugins(cfg.plugins, base)
    except Exception as e:   # a plugin that fails to import: say which, with its error
        return out + [("plugins", f"plugins = {cfg.plugins!r}: {type(e).__name__}: {e}")]
    import axpo.rewards  # noqa: F401  (registers the built-in reward)
    from axpo.registry import REWARDS
    from axpo.tasks import TASKS
    from axpo.tools import TOOLS

    for i, name in enumerate(cfg.tools.enabled):
        if name not in TOOLS:
            out.append((f"tools.enabled", f"tools.enabled[{i}] = {name!r}: unknown tool; registered: "
                        f"{', '.join(TOOLS.names())}"))
    if cfg.data.reward not in REWARDS:
        out.append(("data.reward", f"data.reward = {cfg.data.reward!r}: unknown reward; registered: "
                    f"{', '.join(REWARDS.names())}"))
    uses_builtin = not (cfg.data.train_file and cfg.data.eval_file and cfg.data.sft_file)
    if uses_builtin:
        for i, name in enumerate(cfg.data.tasks):
            if name not in TASKS:
                out.append(("data.tasks", f"data.tasks[{i}] = {name!r}: unknown task; registered: "
                            f"{', '.join(TASKS.names())}"))
    for name in cfg.data.task_options:
        if name not in TASKS:
            out.append(("data.task_options", f"data.task_options has options for {name!r}, which is no "
                        f"registered task ({', '.join(TASKS.names())})"))
    for key in ("train_file", "eval_file", "sft_file"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        p = Path(value)
        if not p.exists():
            out.append((f"data.{key}", f"data.{key} = {value!r}: no such file"))
        elif p.is_dir():
            out.append((f"data.{key}", f"data.{key} = {value!r}: is a folder, not a JSONL/JSON/parquet file"))
        elif p.stat().st_size == 0 or (p.suffix != ".parquet" and not p.read_bytes()[:1 << 20].strip()):
            out.append((f"data.{key}", f"data.{key} = {value!r}: the file is empty"))
    return out


def _groups_help() -> str:
    lines = ["config groups (override any field with group.field=value):"]
    for f in dataclasses.fields(Config):
        sub = typing.get_type_hints(Config)[f.name]
        if not dataclasses.is_dataclass(sub):
            lines.append(f"  {f.name:8s} {_type_name(sub)}")
            continue
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
