"""The main job end to end under torchrun (gloo, 2 CPU processes): run folder contents, 1-vs-2
process SFT parity, crash-and-resume equality, the exported Hugging Face folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def launch(out, *args, nproc=2, background=False, env=None):
    # --standalone: a private rendezvous on a free local port, so runs never collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "axpo" / "train.py"), "--config", SMOKE, "--output-dir", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def rows(out, stage):
    from axpo.metrics import read_metrics

    return [r for r in read_metrics(out) if r["stage"] == stage]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    launch(out)
    return out


def test_run_folder(smoke_run):
    out = smoke_run
    pre, sft, rl, ev = rows(out, "pretrain"), rows(out, "sft"), rows(out, "rl"), rows(out, "eval")
    assert [r["step"] for r in pre] == [1, 2] and "copy_accuracy" in pre[-1]
    assert [r["step"] for r in sft] == [1, 2, 3] and [r["step"] for r in rl] == [1, 2]
    for r in rl:
        for k in ("loss", "reward", "accuracy", "tool_use_rate", "all_wrong_rate", "trigger_rate",
                  "prefixes_selected", "resample_success_rate", "extra_token_share", "zero_var_groups_before",
                  "zero_var_groups_after", "cut_entropy", "entropy", "grad_norm", "tokens_per_s", "step_time",
                  "truncated_rate"):
            assert k in r, k
    assert 0 <= r["truncated_rate"] <= 1
    assert len(ev) == 2 and "pass@1" in ev[0] and "truncated_rate" in ev[0]
    assert (out / "config.yaml").exists() and (out / "summary.md").exists()
    assert list((out / "tensorboard").glob("events.*"))
    assert (out / "rl_tool_use_rate.png").exists() and (out / "rl_reward.png").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_rl_000002"
    summary = (out / "summary.md").read_text()
    assert "Evaluation" in summary and "Copy pre-training" in summary
    assert (out / "pretrain_loss.png").exists() and (out / "sft_loss.png").exists()


def test_exported_folder_loads_and_generates(smoke_run):
    from transformers import AutoModelForImageTextToText

    from axpo.models import load_processor

    model = AutoModelForImageTextToText.from_pretrained(str(smoke_run / "hf"))
    proc = load_processor(str(smoke_run / "hf"))
    text = proc.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                    add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_sft_step_same_on_one_and_two_processes(tmp_path):
    common = ["sft.steps=1", "rl.steps=0", "trainer.evaluate=false", "trainer.plots=false"]
    launch(tmp_path / "p1", *common, nproc=1)
    launch(tmp_path / "p2", *common, nproc=2)
    l1, l2 = rows(tmp_path / "p1", "sft")[0]["loss"], rows(tmp_path / "p2", "sft")[0]["loss"]
    assert l1 == pytest.approx(l2, rel=1e-5)
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "p1" / "hf" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "p2" / "hf" / "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("kill_at", ["pretrain:1", "sft:2", "rl:1"])
def test_kill_and_resume_matches_uninterrupted(smoke_run, tmp_path, kill_at):
    """SIGKILL right after a checkpoint (mid-pre-training and mid-SFT, where losses depend on the
    exact weights, optimiser state and data position; and mid-RL, where sampled rollouts must
    replay), then --resume: every later step and the final weights equal the uninterrupted run's."""
    stage, step = kill_at.split(":")
    out = tmp_path / "resumed"
    proc = launch(out, background=True, env={"AXPO_KILL_AFTER": kill_at})
    proc.communicate(timeout=900)
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stage}_{int(step):06d}"
    launch(out, "--resume")
    for st, keys in (("pretrain", ("loss", "grad_norm", "tokens")), ("sft", ("loss", "grad_norm", "tokens")),
                     ("rl", ("loss", "reward", "tool_use_rate", "trained_tokens", "rollout_tokens", "entropy"))):
        ref, got = rows(smoke_run, st), rows(out, st)
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for r_ref, r_got in zip(ref, got):
            for key in keys:
                assert r_got[key] == r_ref[key], (st, r_ref["step"], key)
    from safetensors.torch import load_file

    a = load_file(str(smoke_run / "hf" / "model.safetensors"))
    b = load_file(str(out / "hf" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_cli_same_result_for_dcp_and_hf_checkpoint(smoke_run, tmp_path):
    """`python -m axpo.eval` on the final DCP checkpoint and on the exported Hugging Face folder of
    the same policy gives the same numbers (one process, resharded from the 2-rank checkpoint)."""
    import json

    results = []
    for ck in (smoke_run / "checkpoints" / "step_rl_000002", smoke_run / "hf"):
        out = tmp_path / f"{ck.name}.json"
        r = subprocess.run([sys.executable, "-m", "axpo.eval", "--checkpoint", str(ck), "--samples", "4",
                            "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(out.read_text())
        res.pop("eval_time_s")
        results.append(res)
    assert results[0] == results[1]
    res = results[0]
    assert res["questions"] == 12 and "pass@4" in res and "tool_use_rate" in res
    # The accuracy split by tool use recombines to Pass@1 (n rollouts for every question).
    u = res["tool_use_rate"]
    mix = res.get("accuracy_with_tool", 0.0) * u + res.get("accuracy_without_tool", 0.0) * (1 - u)
    assert abs(mix - res["pass@1"]) < 1e-9
    tasks = {k.split("/")[0] for k in res if k.endswith("/pass@1")}
    assert abs(sum(res[f"{t}/tool_use_rate"] for t in tasks) / len(tasks) - u) < 1e-9


def test_init_from_starts_rl_from_given_weights(smoke_run, tmp_path):
    """RL from the smoke run's exported policy: the new run's pre-RL evaluation equals the smoke
    run's final evaluation exactly (same weights, same held-out questions and sampling seeds)."""
    import json

    out = tmp_path / "init"
    launch(out, f"trainer.init_from={smoke_run / 'hf'}", "rl.steps=1")
    assert rows(out, "sft") == [] and rows(out, "pretrain") == []
    a = json.loads((out / "evals.json").read_text())["after_sft"]
    b = json.loads((smoke_run / "evals.json").read_text())["after_rl"]
    a.pop("eval_time_s"), b.pop("eval_time_s")
    assert a == b
