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
    assert "Evaluation" in summary and "Copy pre-training" in summary and "## SFT" in summary
    assert "3 steps; loss" in summary
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


PARITY = ["sft.steps=1", "rl.steps=0", "trainer.evaluate=false", "trainer.plots=false"]


def run_differences(p1: Path, p2: Path) -> list[str]:
    """What must hold between a 1-process and a 2-process run of the same steps, and why.

    The two runs split each step's rows over a different number of ranks, so the gradients are the
    same sums in another float order: equal up to rounding, never bit-equal.
    - Losses are computed before each update from (nearly) the same weights: equal to rel 1e-5.
    - The global gradient norm before each clip/step is a sum of squares in another order: rel 1e-4.
    - Weights after the steps: Adam's first updates are lr * m_hat / sqrt(v_hat), about
      lr * g / (|g| + eps): for an element whose gradient is far above its rounding noise the two
      updates agree to float precision; for one whose gradient is at the noise level (near zero)
      the normalisation can turn a 1e-9 difference into anything up to a full step. So every
      element must lie within the most Adam can move it (2 x the sum of the step sizes taken,
      |m_hat / sqrt(v_hat)| <= ~1 at these betas), and all but a tiny share (1e-4 of the
      elements: those with noise-level gradients) must agree to rtol 1e-4 / atol 1e-5.
    Returns the violations (empty when the runs agree)."""
    import yaml
    from safetensors.torch import load_file

    bad = []
    for stage in ("pretrain", "sft"):
        r1, r2 = rows(p1, stage), rows(p2, stage)
        if [r["step"] for r in r1] != [r["step"] for r in r2]:
            return [f"{stage}: steps differ"]
        for a, b in zip(r1, r2):
            if a["loss"] != pytest.approx(b["loss"], rel=1e-5):
                bad.append(f"{stage} step {a['step']}: loss {a['loss']} vs {b['loss']}")
            if a["grad_norm"] != pytest.approx(b["grad_norm"], rel=1e-4):
                bad.append(f"{stage} step {a['step']}: grad_norm {a['grad_norm']} vs {b['grad_norm']}")
    # The step sizes actually taken: each stage's lr under the linear warm-up of Trainer._make_optimizer.
    cfg = yaml.safe_load((p1 / "config.yaml").read_text())
    warm = max(1, cfg["optim"]["warmup_steps"])
    step_sum = sum((cfg[st]["lr"] or cfg["optim"]["lr"]) * min(1.0, (s + 1) / warm)
                   for st in ("pretrain", "sft") for s in range(cfg[st]["steps"]))
    bound = 2 * 1.01 * step_sum
    w1 = load_file(str(p1 / "hf" / "model.safetensors"))
    w2 = load_file(str(p2 / "hf" / "model.safetensors"))
    if set(w1) != set(w2):
        return bad + ["exported tensors differ"]
    n_total = sum(v.numel() for v in w1.values())
    n_off = 0
    for k in w1:
        diff = (w1[k].double() - w2[k].double()).abs()
        if float(diff.max()) > bound:
            bad.append(f"{k}: max |dw| {float(diff.max()):.3g} > Adam bound {bound:.3g}")
        n_off += int((diff > 1e-5 + 1e-4 * w2[k].double().abs()).sum())
    if n_off > 1e-4 * n_total:
        bad.append(f"{n_off} of {n_total} weights differ beyond rtol 1e-4 / atol 1e-5 (allowed: 1e-4 of them)")
    return bad


@pytest.fixture(scope="module")
def parity_one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("p1")
    launch(out, *PARITY, nproc=1)
    return out


def test_sft_step_same_on_one_and_two_processes(parity_one_process, tmp_path):
    launch(tmp_path / "p2", *PARITY, nproc=2)
    assert run_differences(parity_one_process, tmp_path / "p2") == []


def test_parity_check_catches_a_real_difference(parity_one_process, tmp_path):
    """The same comparison rejects a 2-process run whose SFT step used a 10% larger learning rate:
    losses and gradient norms still agree (they are measured before that update), so only the
    weight criterion can catch it, and must."""
    launch(tmp_path / "p2", *PARITY, "sft.lr=3.3e-3", nproc=2)
    bad = run_differences(parity_one_process, tmp_path / "p2")
    assert bad and any("weights differ beyond" in b for b in bad), bad


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


def test_init_stage_sft_runs_sft_from_given_weights(smoke_run, tmp_path):
    """trainer.init_stage=sft: SFT (not pre-training) from the given weights, RL's reference policy
    is then the new SFT checkpoint, and eval_after_sft=false leaves that evaluation out."""
    import json

    out = tmp_path / "init_sft"
    launch(out, f"trainer.init_from={smoke_run / 'hf'}", "trainer.init_stage=sft", "rl.steps=1",
           "trainer.eval_after_sft=false")
    assert rows(out, "pretrain") == [] and [r["step"] for r in rows(out, "sft")] == [1, 2, 3]
    assert [r["step"] for r in rows(out, "rl")] == [1]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_sft_000003" and all(c.startswith(("step_sft_", "step_rl_")) for c in ckpts)
    evals = json.loads((out / "evals.json").read_text())
    assert "after_sft" not in evals and "pass@1" in evals["after_rl"]


# --------------------------------------------------------------------------------------------
# Issue #18 (R1, NaN) and #13: resume that never restarts silently, retention, skipped steps


def test_retention_and_exported_file_modes(smoke_run):
    """keep_last=3 (default): the newest three checkpoints, the last SFT one among them; the
    exported files are readable by others (safetensors alone writes 0600)."""
    import stat

    ck = smoke_run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_rl_000001", "step_rl_000002",
                                                                 "step_sft_000003"]
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (smoke_run / "hf").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def _copy_run(src: Path, dst: Path) -> None:
    """A copy of a finished run to resume: small files copied, checkpoint files hard-linked (the
    resumed run only reads them or replaces whole files)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("hf", "tensorboard", "checkpoints"))
    shutil.copytree(src / "checkpoints", dst / "checkpoints", copy_function=os.link)


def test_resume_falls_back_to_the_newest_complete_checkpoint(smoke_run, tmp_path):
    """`latest` names a deleted folder and metrics.jsonl ends in a torn line: --resume says it
    starts from the newest complete checkpoint (rl step 1), drops the rows after it and the torn
    line, re-runs rl step 2 and ends with the uninterrupted run's rows and weights, no duplicates."""
    import json
    import shutil

    out = tmp_path / "run"
    _copy_run(smoke_run, out)
    shutil.rmtree(out / "checkpoints" / "step_rl_000002")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "rl", "step": 3, "lo')
    r = launch(out, "--resume")
    assert (f"--resume: {out / 'checkpoints' / 'latest'} names step_rl_000002, which does not exist; resuming "
            f"from {out / 'checkpoints' / 'step_rl_000001'}, the newest complete checkpoint") in r.stdout, r.stdout
    assert "(rl step 1); dropped 3 metrics rows logged after it" in r.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(x["stage"], x["step"]) for x in lines]
    assert len(keys) == len(set(keys)) and keys[-3:] == [("rl", 1), ("rl", 2), ("eval", 1)]
    ref, got = rows(smoke_run, "rl"), rows(out, "rl")
    for key in ("loss", "reward", "trained_tokens", "rollout_tokens", "entropy"):
        assert [x[key] for x in got] == [x[key] for x in ref], key
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_rl_000002"
    from safetensors.torch import load_file

    a = load_file(str(smoke_run / "hf" / "model.safetensors"))
    b = load_file(str(out / "hf" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    proc = launch(tmp_path / "fresh", "--resume", background=True)
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0
    assert "--resume: no complete checkpoint to resume from" in text and "leave out --resume" in text, text[-3000:]
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_non_finite_steps_are_logged_and_stop_the_run(tmp_path):
    """A learning rate of 1e30 (valid for the config check, absurd for the model) turns step 1's
    update into weights near 1e30 whose next forward overflows; every later step has a non-finite
    loss and is skipped: logged as such with skipped=1, and the third in a row stops the run."""
    import math

    out = tmp_path / "nan"
    proc = launch(out, "pretrain.lr=1e30", "pretrain.steps=8", "trainer.max_skipped_steps=3", background=True)
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0
    assert "pretrain step 4: 3 steps in a row were skipped for a non-finite loss or gradient norm" in text, text[-3000:]
    pre = rows(out, "pretrain")
    assert [r["step"] for r in pre] == [1, 2, 3, 4]
    assert pre[0]["skipped"] == 0 and math.isfinite(pre[0]["loss"])
    for r in pre[1:]:
        assert r["skipped"] == 1 and not math.isfinite(r["loss"]) and not math.isfinite(r["grad_norm"]), r
