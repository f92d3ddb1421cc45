"""The shipped copy-pretrained tiny base: the built-in run's starting weights (`model.tiny_base: copy`).

Every built-in tool call copies values (numbers into `print(...)`, a cell into a box, a fact out of
a search result). A random tiny model learns to copy slowly: the in-run copy pre-training of 750
steps reached a held-out copy accuracy of 0.14-0.16, and the quickstart's SFT and RL then learned
almost nothing (Pass@1 0.056 -> 0.057). Trained 3000 steps, the same recipe reaches 0.48, and SFT +
RL from it learn the tasks (README). 3000 steps take about 12 minutes of one core, too long for the
quickstart, so the result ships as a small asset, the way a real run starts from a pretrained
checkpoint: `axpo/assets/tiny_copy_base.safetensors`, the text model and LM head only (the vision
tower is untouched by copy pre-training and comes from the seed, as before).

The asset is valid only for the tokenizer and the tiny sizes it was made with. Both are written
into its metadata and checked before any stage runs, with a message that says what to do.

Made by two commands (the second measures the copy accuracy it records):

    python axpo/train.py --output-dir runs/copy_base model.tiny_base=random pretrain.steps=3000 \
        sft.steps=0 rl.steps=0 trainer.evaluate=false
    python -m axpo.copy_base --run-dir runs/copy_base
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

from axpo.config import ConfigError

ASSET = Path(__file__).resolve().parent / "assets" / "tiny_copy_base.safetensors"
FORMAT = "axpo-tiny-copy-base/1"
# The tiny sizes the text weights' shapes depend on (vision sizes and image budgets do not).
TEXT_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "tie_word_embeddings")
TEXT_PREFIXES = ("model.language_model.", "lm_head.")
REMEDY = ("use model.tiny_base=random with copy pre-training (pretrain.steps=3000), or remake the asset "
          "(see axpo/copy_base.py)")


class CopyBaseError(ConfigError):
    """The shipped base does not fit this model or tokenizer (a user-facing configuration error)."""


def text_sizes(tiny) -> dict:
    return {f: getattr(tiny, f) for f in TEXT_FIELDS}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the fast tokenizer's full definition (vocabulary, merges, added tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def read_metadata(path: str | Path = ASSET) -> dict:
    """The asset's metadata, read from the safetensors header alone (no torch, no tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CopyBaseError(f"cannot read the copy-pretrained base {path}: {e}; {REMEDY}") from e
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CopyBaseError(f"{path} is not an {FORMAT} file (format {meta.get('format')!r}); {REMEDY}")
    return meta


def sizes_mismatch(tiny, path: str | Path = ASSET) -> str | None:
    """Why `tiny`'s text sizes cannot take the asset, or None when they can."""
    return _sizes_diff(tiny, read_metadata(path))


def _sizes_diff(tiny, meta: dict) -> str | None:
    want = json.loads(meta["tiny_text_sizes"])
    have = text_sizes(tiny)
    diff = {k: (have[k], want[k]) for k in want if have.get(k) != want[k]}
    if not diff:
        return None
    return ", ".join(f"model.tiny.{k} = {h!r} (the base has {w!r})" for k, (h, w) in diff.items())


def load_copy_base(model, tokenizer, tiny, path: str | Path = ASSET) -> dict:
    """Load the asset's text weights into a freshly built tiny model; returns the metadata.
    Raises CopyBaseError naming the mismatch when the tokenizer or sizes differ."""
    import torch
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if (why := _sizes_diff(tiny, meta)) is not None:
        raise CopyBaseError(f"model.tiny_base = 'copy': the shipped base {path} was made for other tiny "
                            f"sizes: {why}; {REMEDY}")
    fp = tokenizer_fingerprint(tokenizer)
    if fp != meta["tokenizer_sha256"]:
        import tokenizers
        raise CopyBaseError(
            f"model.tiny_base = 'copy': the shipped base {path} was made for another tokenizer "
            f"(sha256 {meta['tokenizer_sha256'][:12]}, built with tokenizers {meta.get('tokenizers', '?')}; "
            f"this one is {fp[:12]}, tokenizers {tokenizers.__version__}: the built-in BPE trained "
            f"differently); {REMEDY}")
    tensors = load_file(str(path))
    state = model.state_dict()
    for k, v in tensors.items():
        if k not in state or state[k].shape != v.shape:
            raise CopyBaseError(f"the shipped base {path} has {k} {tuple(v.shape)}, which this model "
                                f"{'lacks' if k not in state else f'has as {tuple(state[k].shape)}'}; {REMEDY}")
    missing = [k for k in state if k.startswith(TEXT_PREFIXES) and k not in tensors]
    if missing:
        raise CopyBaseError(f"the shipped base {path} lacks {missing[:3]}; {REMEDY}")
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v)
    return meta


def package(run_dir: Path, out: Path) -> dict:
    """Write the final policy of a copy pre-training run (`run_dir/hf`) as the asset: its text
    weights, with the tokenizer fingerprint, the text sizes and the held-out copy accuracy."""
    import tokenizers
    import torch
    from safetensors.torch import load_file, save_file

    from axpo.config import load_config
    from axpo.models import build_tiny_model, build_tiny_processor
    from axpo.pretrain import CopySequences, copy_accuracy

    cfg = load_config(str(run_dir / "config.yaml"), ["model.tiny_base=random"])
    if cfg.model.name != "tiny":
        raise CopyBaseError(f"{run_dir} trained {cfg.model.name!r}, not the built-in tiny model")
    weights: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "hf").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        raise CopyBaseError(f"{run_dir / 'hf'} holds no safetensors weights (did the run finish?)")
    text = {k: v.float().contiguous() for k, v in weights.items() if k.startswith(TEXT_PREFIXES)}
    processor = build_tiny_processor(cfg.model.tiny)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    pre_steps = max((r["step"] for r in steps if r.get("stage") == "pretrain"), default=0)
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        git = ""
    meta = {"format": FORMAT, "tokenizer_sha256": tokenizer_fingerprint(processor.tokenizer),
            "tokenizers": tokenizers.__version__, "tiny_text_sizes": json.dumps(text_sizes(cfg.model.tiny)),
            "pretrain_steps": str(pre_steps), "pretrain_lr": str(cfg.pretrain.lr),
            "pretrain_sequences_per_step": str(cfg.pretrain.questions_per_step),
            "seed": str(cfg.trainer.seed), "packaged_at_git": git}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(text, str(out), metadata={**meta, "copy_accuracy": "pending"})
    # Measure what the asset gives, through the same loader the trainer uses.
    model = build_tiny_model(cfg.trainer.seed, cfg.model.tiny, processor)
    load_copy_base(model, processor.tokenizer, cfg.model.tiny, out)
    x, m = CopySequences(processor.tokenizer).held_out()
    meta["copy_accuracy"] = f"{copy_accuracy(model.eval(), x, m):.4f}"
    save_file(text, str(out), metadata=meta)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path, help="a finished copy pre-training run folder")
    ap.add_argument("--out", type=Path, default=ASSET, help=f"where to write the base (default {ASSET})")
    args = ap.parse_args(argv)
    try:
        meta = package(args.run_dir, args.out)
    except CopyBaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
