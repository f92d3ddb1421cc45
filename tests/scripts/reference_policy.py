"""The sharded KL reference policy (`Trainer._reference_policy`) from each of its sources, under
torchrun (run by tests/test_rank0_load.py):

    torchrun --nproc_per_node=2 tests/scripts/reference_policy.py OUT_DIR

1. no source: the current weights; 2. the newest SFT checkpoint (DCP), saved before the policy
is perturbed; 3. a Hugging Face folder (`trainer.init_from`), exported with `export_hf` after
the perturbation. Each time the reference's log-probs must equal those of the weights it was
built from; (3) is also compared with a plain unsharded `from_pretrained`. Results go to
OUT_DIR/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(out_dir: str) -> None:
    from transformers import AutoModelForImageTextToText

    from axpo.checkpoint import export_hf
    from axpo.config import load_config
    from axpo.distributed import Dist
    from axpo.policy import PolicyModel
    from axpo.trainer import Trainer
    from axpo.update import old_logprobs

    out = Path(out_dir)
    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"),
                      [f"trainer.output_dir={out / 'run'}", "trainer.tensorboard=false", "trainer.evaluate=false"])
    t = Trainer(cfg)
    d = t.d
    g = torch.Generator().manual_seed(d.rank)
    rows = [{"tokens": torch.randint(0, 600, (n,), generator=g).tolist(), "pixel_values": [], "grids": []}
            for n in (17, 29, 23)]

    def logps(policy):
        lp = old_logprobs(policy, rows, t.fmt, 10_000, 1.0, d)[0]
        return torch.cat(lp)

    res = {"rank": d.rank}
    before = logps(t.policy)
    res["no_source_equal"] = torch.equal(logps(t._reference_policy()), before)

    t._make_optimizer(cfg.sft)
    t.ckpt.save(t.policy, t.optimizer, t.scheduler, stage="sft", step=1)
    with torch.no_grad():
        torch.manual_seed(123)   # the same perturbation on every rank's shards
        for p in t.policy.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(0.05 * torch.randn_like(local))
    after = logps(t.policy)
    res["perturbed_differs"] = not torch.allclose(after, before)
    res["dcp_equal"] = torch.equal(logps(t._reference_policy()), before)

    hf_dir = out / "hf"
    export_hf(t.policy, t.processor, hf_dir, d, bucket_bytes=4096)   # small buckets: many pieces
    t.cfg.trainer.init_from = str(hf_dir)
    ref = logps(t._reference_policy())
    res["hf_equal"] = torch.equal(ref, after)
    plain = PolicyModel(AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval())
    lp = torch.cat(old_logprobs(plain, rows, t.fmt, 10_000, 1.0, Dist())[0])
    res["hf_vs_unsharded_max_abs_diff"] = float((lp - ref).abs().max())
    (out / f"rank{d.rank}.json").write_text(json.dumps(res))
    t.close()


if __name__ == "__main__":
    main(sys.argv[1])
