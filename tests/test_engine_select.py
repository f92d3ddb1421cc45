"""`rollout.engine=vllm` in the trainer, the parts that need no vLLM (main environment): the config
check names the extra to install before any stage runs, the vLLM-only rules name their fields,
truncated importance sampling's weights, and the bucketed weight stream the vLLM sync consumes
(`streamed_weights`: full tensors from FSDP2 shards under torchrun, equal to the policy's weights).
The trainer's end-to-end run on vLLM is in tests/test_vllm.py (second environment)."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here: nothing is missing")
def test_engine_vllm_without_vllm_names_the_extra_before_anything_runs():
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["rollout.engine=vllm"])
    msg = str(e.value)
    assert "command line: rollout.engine = 'vllm': needs vLLM, which is not installed here" in msg
    assert "pip install -e .[vllm]" in msg and ".ci/vllm_env.sh" in msg
    assert "rollout.engine=builtin" in msg


def test_train_py_says_it_in_one_line(tmp_path):
    if HAVE_VLLM:
        pytest.skip("vLLM is installed here")
    r = subprocess.run([sys.executable, str(ROOT / "axpo" / "train.py"), "--config", str(SMOKE),
                        "rollout.engine=vllm", "--output-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install -e .[vllm]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()     # refused before anything was built or written


@pytest.mark.parametrize("overrides, message", [
    (["rollout.temperature=0.7"], "rollout.temperature = 0.7: must be 1.0 with rollout.engine=vllm"),
    (["rollout.vllm_max_model_len=100"], "rollout.vllm_max_model_len = 100: must be >= rollout.max_total_tokens"),
    (["rollout.vllm_kv_cache_gib=0"], "rollout.vllm_kv_cache_gib = 0.0: must be > 0 (GiB)"),
    (["rollout.vllm_gpu_memory_utilization=1.5"], "rollout.vllm_gpu_memory_utilization = 1.5: must be in (0, 1]"),
    (["rollout.tis_cap=0.5"], "rollout.tis_cap = 0.5: must be 0 (off) or >= 1"),
])
def test_vllm_rules_name_their_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["rollout.engine=vllm", *overrides])
    assert message in str(e.value), str(e.value)


def test_builtin_engine_accepts_any_positive_temperature_and_the_new_defaults():
    cfg = load_config(SMOKE, ["rollout.temperature=0.7"])
    r = cfg.rollout
    assert (r.engine, r.tis_cap, r.release_weights_during_update, r.vllm_max_model_len) == ("builtin", 0.0, False, None)


def test_8b_config_rolls_out_with_vllm_and_releases_weights_during_update():
    import yaml

    r = yaml.safe_load((ROOT / "configs" / "qwen3vl-8b-axpo.yaml").read_text())["rollout"]
    assert r["engine"] == "vllm" and r["release_weights_during_update"] is True
    assert r["temperature"] == 1.0


class _T:
    def __init__(self, logprobs, loss_mask):
        self.logprobs, self.loss_mask = logprobs, loss_mask


def test_tis_weights_are_capped_ratios_on_sampled_tokens_only():
    from axpo.rollout.vllm_engine import tis_weights

    # tokens: prompt, sampled (trainer more likely), sampled (trainer far more likely: capped),
    # forced placeholder (engine 0.0), sampled (trainer less likely)
    t = _T([0.0, -1.0, -3.0, 0.0, -0.5], [0, 1, 1, 1, 1])
    trainer = torch.tensor([0.0, -0.9, -0.1, -0.2, -0.7])
    (w,), st = tis_weights([t], [trainer], cap=2.0)
    want = [1.0, math.exp(0.1), 2.0, 1.0, math.exp(-0.2)]
    assert torch.allclose(w, torch.tensor(want), atol=1e-6), w
    assert st["n"] == 3 and st["capped"] == 1
    assert st["abs_diff_sum"] == pytest.approx(0.1 + 2.9 + 0.2, abs=1e-5)


def test_scaling_advantages_by_tis_weight_scales_each_tokens_clipped_loss():
    """Why the trainer applies TIS to the advantages: for w >= 0 the clipped surrogate of (A w)
    is w times that of A, token by token, so the token-mean loss becomes the TIS-weighted loss."""
    from axpo.kernels import clipped_policy_loss

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 7, generator=g)
    old = logp + 0.3 * torch.randn(3, 7, generator=g)
    adv = torch.randn(3, 7, generator=g)
    mask = torch.ones(3, 7)
    w = 2 * torch.rand(3, 7, generator=g)
    kw = dict(clip_low=0.2, clip_high=0.28, ref_logp=None, beta=0.0, agg="token-mean", normalizer=21.0)
    scaled, _ = clipped_policy_loss(logp, old, adv * w, mask, **kw)
    per_token = []
    for i in range(3):
        for j in range(7):
            m = torch.zeros(3, 7)
            m[i, j] = 1
            per_token.append(float(clipped_policy_loss(logp, old, adv, m, **kw)[0]) * float(w[i, j]))
    assert float(scaled) == pytest.approx(sum(per_token), rel=1e-5, abs=1e-7)


def test_streamed_weights_single_process_equal_the_state_dict():
    from axpo.models import build_tiny_model, build_tiny_processor, canonical_name
    from axpo.policy import PolicyModel
    from axpo.rollout.vllm_engine import streamed_weights

    policy = PolicyModel(build_tiny_model(seed=0, processor=build_tiny_processor()))
    want = {canonical_name(k): v for k, v in policy.state_dict().items()}
    got = dict(streamed_weights(policy, bucket_bytes=1 << 16))
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v) and got[k].data_ptr() != v.data_ptr(), k


def test_streamed_weights_from_fsdp2_shards_under_torchrun(tmp_path):
    """2 gloo ranks, FSDP2-sharded tiny policy, small buckets (tensors split across buckets): every
    rank's stream is every full tensor exactly once, equal to the unsharded weights."""
    script = tmp_path / "stream.py"
    script.write_text('''
import sys, torch
from axpo import distributed
from axpo.models import build_tiny_model, build_tiny_processor, canonical_name
from axpo.policy import PolicyModel
from axpo.rollout.vllm_engine import streamed_weights
d = distributed.init()
full = build_tiny_model(seed=0, processor=build_tiny_processor())
want = {canonical_name(k): v.clone() for k, v in PolicyModel(full).state_dict().items()}
policy = distributed.shard(PolicyModel(build_tiny_model(seed=0, processor=build_tiny_processor())), d,
                           mixed_precision=False, activation_checkpointing=False)
seen = []
for name, t in streamed_weights(policy, bucket_bytes=1 << 14):
    assert torch.equal(t, want[name]), name
    seen.append(name)
assert sorted(seen) == sorted(want), (len(seen), len(want))
assert any(hasattr(v, "to_local") for v in policy.state_dict().values())
# One file per rank: two ranks printing to one pipe interleave their lines ("okok 0 86").
open(sys.argv[1] + f"/ok{d.rank}", "w").write(str(len(seen)))
distributed.close()
''')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = [(tmp_path / f"ok{rank}").read_text() for rank in (0, 1)]
    assert counts[0] == counts[1] and int(counts[0]) > 0, counts
