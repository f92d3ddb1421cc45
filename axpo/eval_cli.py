"""`python -m axpo.eval --checkpoint PATH`: Pass@k, tool-use and tool-error rates of any checkpoint
(a DCP checkpoint folder of a run, or a Hugging Face folder), on the run's held-out questions or a
user file. See axpo/eval.py for what is measured."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from axpo import eval as _eval


def checkpoint_error(path: str) -> str | None:
    """Why `path` is not a checkpoint this command can load, or None."""
    p = Path(path)
    if not p.exists():
        return f"--checkpoint {path}: no such file or folder"
    if not p.is_dir():
        return f"--checkpoint {path}: not a folder (give a DCP checkpoint folder or a Hugging Face folder)"
    if (p / "config.json").exists() or (p / ".metadata").exists():
        return None
    return (f"--checkpoint {path}: neither a Hugging Face folder (config.json) nor a DCP checkpoint "
            "(.metadata); a run's checkpoints are under RUN/checkpoints/step_*, its export under RUN/hf")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m axpo.eval", description=_eval.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="DCP checkpoint folder or Hugging Face folder")
    ap.add_argument("--config", default=None, help="run config (default: the run's config.yaml next to "
                                                    "the checkpoint, else built-in defaults)")
    ap.add_argument("--samples", type=int, default=4, help="n samples per question")
    ap.add_argument("--data-file", default=None, help="user JSONL/parquet instead of built-in held-out tasks")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    err = checkpoint_error(args.checkpoint)
    if err:
        ap.error(err)
    from axpo.trainer import Trainer, config_for_checkpoint

    cfg = config_for_checkpoint(args.checkpoint, args.config, args.overrides)
    if args.data_file:
        cfg.data.eval_file = args.data_file
    cfg.trainer.eval_samples = args.samples
    cfg.trainer.evaluate = True
    trainer = Trainer(cfg, for_eval=True)
    ok = False
    try:
        trainer.load_policy(args.checkpoint)
        result = trainer.evaluate("checkpoint")
        if trainer.d.main:
            text = json.dumps(result, indent=1)
            print(text)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
        ok = True
    finally:
        trainer.close(clean=ok)


if __name__ == "__main__":
    main(sys.argv[1:])
