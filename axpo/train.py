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


def main(argv=None) -> None:
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


if __name__ == "__main__":
    main()
