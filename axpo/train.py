"""Entry point: `torchrun --nproc_per_node=N axpo/train.py [--config configs/x.yaml] [key=value ...]`
or plain `python axpo/train.py`. Parses the config, builds the run, runs copy pre-training (for the
tiny base; `pretrain.steps=0` skips it) -> SFT -> RL -> evaluation, and always closes the run
(process group, loggers) in `finally`."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: drop axpo/ from sys.path so our module names (config, data, models, ...) cannot
    # shadow top-level packages. The installed `axpo` package is imported instead.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]

from axpo.config import parse_args  # noqa: E402

# Errors about the user's input or the run's state: one line naming what is wrong, no traceback
# (under torchrun every rank would print the same one).
USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "FloatingPointError", "SandboxUnavailable")


def _is_user_error(e: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS for c in type(e).__mro__)


def _say(msg: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    trainer = None
    try:
        cfg, _ = parse_args(argv, description="AXPO trainer: copy pre-training (tiny base), SFT on tool-use "
                                              "demonstrations, RL (AXPO or GRPO), evaluation.")
        from axpo.trainer import Trainer

        trainer = Trainer(cfg)
        ok = False
        try:
            trainer.run()
            ok = True
        finally:
            # After a failure, skip the final barrier: the other ranks may never reach it, and the
            # exception must surface (torchrun then stops the whole job).
            trainer.close(clean=ok)
    except KeyboardInterrupt:
        latest = trainer.ckpt.latest() if trainer is not None else None
        where = f"last checkpoint: {latest}" if latest else "no checkpoint yet"
        _say(f"interrupted; resume with --resume ({where})")
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        _say(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
