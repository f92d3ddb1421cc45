"""Resume, retention and run-log robustness without launching a run (issue #18: R1, NaN,
tool_errors; #13): which checkpoint `--resume` picks from real folders on disk, what it says,
what retention keeps, a torn or NaN-holding metrics.jsonl, the skipped-step report of the RL
update, and two RL-step metrics of an in-process (single-process) trainer. The runs themselves are
in tests/test_train.py."""

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from axpo.checkpoint import Checkpointer, CheckpointError, problem, read_meta
from axpo.distributed import Dist
from axpo.metrics import MetricsLogger, plot_run, read_metrics, write_summary

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _fake(root: Path, name: str, *, metadata=True, meta: str | None = "ok") -> Path:
    """A checkpoint folder as Checkpointer.save leaves it (no tensors needed to choose one)."""
    p = root / "checkpoints" / name
    p.mkdir(parents=True)
    if metadata:
        (p / ".metadata").write_bytes(b"dcp")
    if meta == "ok":
        stage, step = name.split("_")[1], int(name.split("_")[2])
        meta = json.dumps({"stage": stage, "step": step, "world": 1, "scheduler": None})
    if meta is not None:
        (p / "meta.json").write_text(meta)
    return p


def _latest(root: Path, text: str | None):
    f = root / "checkpoints" / "latest"
    if text is not None:
        f.write_text(text)
    return f


def _run(tmp_path, latest="step_rl_000002", *, break_last=None):
    for name in ("step_sft_000003", "step_rl_000001", "step_rl_000002"):
        _fake(tmp_path, name)
    if break_last == "truncated_meta":
        (tmp_path / "checkpoints" / "step_rl_000002" / "meta.json").write_text('{"stage": "rl", "st')
    elif break_last == "no_metadata":
        (tmp_path / "checkpoints" / "step_rl_000002" / ".metadata").unlink()
    elif break_last == "deleted":
        import shutil

        shutil.rmtree(tmp_path / "checkpoints" / "step_rl_000002")
    _latest(tmp_path, latest)
    return Checkpointer(tmp_path, Dist())


def test_resume_uses_latest_when_it_is_complete(tmp_path):
    path, meta, note = _run(tmp_path).resume_point()
    assert path.name == "step_rl_000002" and meta["step"] == 2 and note is None


@pytest.mark.parametrize("latest, broken, expect, words", [
    ("", None, "step_rl_000002", "latest is empty"),
    (None, None, "step_rl_000002", "latest is missing"),
    ("step_rl_000099", None, "step_rl_000002", "names step_rl_000099, which does not exist"),
    ("step_rl_000002", "deleted", "step_rl_000001", "names step_rl_000002, which does not exist"),
    ("step_rl_000002", "truncated_meta", "step_rl_000001", "meta.json that is not valid JSON"),
    ("step_rl_000002", "no_metadata", "step_rl_000001", "has no .metadata"),
])
def test_resume_falls_back_to_newest_complete_checkpoint_and_says_so(tmp_path, latest, broken, expect, words):
    path, meta, note = _run(tmp_path, latest, break_last=broken).resume_point()
    assert path.name == expect and (meta["stage"], meta["step"]) == ("rl", int(expect[-6:]))
    assert note.startswith("--resume: ") and words in note and f"resuming from {path}" in note, note


def test_resume_without_a_complete_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*leave out --resume"):
        Checkpointer(tmp_path, Dist()).resume_point()
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint folders"):
        Checkpointer(tmp_path, Dist()).resume_point()
    _fake(tmp_path, "step_sft_000001", meta='{"stage": "sft"')
    _fake(tmp_path, "step_sft_000002", metadata=False)
    _latest(tmp_path, "step_sft_000002")
    with pytest.raises(CheckpointError) as e:
        Checkpointer(tmp_path, Dist()).resume_point()
    msg = str(e.value)
    assert "step_sft_000001 has a meta.json that is not valid JSON" in msg and "step_sft_000002 has no .metadata" in msg
    assert "To start the run from scratch, leave out --resume" in msg


def test_truncated_meta_json_error_names_the_checkpoint(tmp_path):
    p = _fake(tmp_path, "step_rl_000001", meta='{"stage": "rl", "st')
    with pytest.raises(CheckpointError, match=f"checkpoint {p} has a meta.json that is not valid JSON"):
        read_meta(p)
    with pytest.raises(CheckpointError, match=str(p)):
        Checkpointer(tmp_path, Dist()).load(None, None, None, p)
    assert problem(tmp_path / "nope") == "does not exist"


def test_retention_keeps_the_newest_and_the_last_sft_checkpoint(tmp_path):
    names = ["step_pretrain_000001", "step_pretrain_000002", "step_sft_000001", "step_sft_000002",
             "step_rl_000001", "step_rl_000002", "step_rl_000003"]
    for n in names:
        _fake(tmp_path, n)
    _fake(tmp_path, "step_pretrain_000003", metadata=False)   # a crash mid-save long ago
    _fake(tmp_path, "step_rl_000009")                         # newer: left by an earlier, longer run
    ck = Checkpointer(tmp_path, Dist(), keep_last=2)
    ck._prune(tmp_path / "checkpoints" / "step_rl_000003")
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert left == ["step_rl_000002", "step_rl_000003", "step_rl_000009", "step_sft_000002"]
    ck = Checkpointer(tmp_path, Dist(), keep_last=1)
    ck._prune(tmp_path / "checkpoints" / "step_rl_000003")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == \
        ["step_rl_000003", "step_rl_000009", "step_sft_000002"]
    for keep in (None, 0):   # keeps everything
        Checkpointer(tmp_path, Dist(), keep_last=keep)._prune(tmp_path / "checkpoints" / "step_rl_000009")
        assert len([p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]) == 3
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, Dist(), keep_last=-1)


def test_config_fields():
    from axpo.config import load_config

    cfg = load_config(SMOKE, ["trainer.keep_last=null", "trainer.max_skipped_steps=0"])
    assert cfg.trainer.keep_last is None and cfg.trainer.max_skipped_steps == 0
    assert load_config(None).trainer.keep_last == 3 and load_config(None).trainer.max_skipped_steps == 5


# --------------------------------------------------------------------------------------------
# metrics.jsonl


def _log(tmp_path, rows, resume=False):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume=resume)
    for stage, step, m in rows:
        log.log(stage, step, m)
    log.close()
    return log


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    _log(tmp_path, [("rl", 1, {"loss": 0.5, "reward": 0.1}), ("rl", 2, {"loss": 0.4, "reward": 0.2})])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "rl", "step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 3 is not a metrics row \(a torn last line"):
        rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    with pytest.warns(UserWarning):
        assert plot_run(tmp_path, "rl") and write_summary(tmp_path, evals={}, wall_time=1.0, config_name="x")


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    rows = [("pretrain", 1, {"loss": 1.0}), ("sft", 1, {"loss": 1.0}), ("sft", 2, {"loss": 0.9}),
            ("eval", 0, {"pass@1": 0.1}), ("rl", 1, {"loss": 0.1}), ("rl", 2, {"loss": 0.2}),
            ("rl", 3, {"loss": 0.3}), ("eval", 1, {"pass@1": 0.2})]
    _log(tmp_path, rows)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "rl", "st')
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume=True)
    with pytest.warns(UserWarning, match="torn"):
        assert log.truncate_after("rl", 2, keep_evals=[0]) == 3   # rl 3, eval 1, the torn line
    log.log("rl", 3, {"loss": 0.33})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["stage"], json.loads(x)["step"]) for x in lines] == \
        [("pretrain", 1), ("sft", 1), ("sft", 2), ("eval", 0), ("rl", 1), ("rl", 2), ("rl", 3)]
    assert json.loads(lines[-1])["loss"] == 0.33
    assert log.truncate_after("sft", 1) == 5   # sft 2, the evaluation after SFT, rl 1-3
    assert [(r["stage"], r["step"]) for r in read_metrics(tmp_path)] == [("pretrain", 1), ("sft", 1)]


def test_nan_metrics_round_trip_and_plot(tmp_path):
    _log(tmp_path, [("rl", 1, {"loss": 0.5, "grad_norm": 1.0, "skipped": 0.0}),
                    ("rl", 2, {"loss": float("nan"), "grad_norm": float("inf"), "skipped": 1.0}),
                    ("rl", 3, {"loss": 0.4, "grad_norm": 1.0, "skipped": 0.0, "reward": 0.5})])
    assert "NaN" in (tmp_path / "metrics.jsonl").read_text()
    r = read_metrics(tmp_path)[1]
    assert math.isnan(r["loss"]) and r["grad_norm"] == math.inf and r["skipped"] == 1
    assert (tmp_path / "rl_loss.png") in plot_run(tmp_path, "rl")


def test_wandb_without_the_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed
    with pytest.raises(ImportError, match=r"trainer.wandb=true needs the wandb package: pip install -e .\[wandb\]"):
        MetricsLogger(tmp_path, enabled=False, wandb=True)


# --------------------------------------------------------------------------------------------
# Non-finite RL steps


def test_skipped_rl_step_reports_the_non_finite_values(tiny_processor):
    from axpo.agent.format import AgentFormat
    from axpo.agent.trajectory import Trajectory
    from axpo.models import build_tiny_model
    from axpo.policy import PolicyModel
    from axpo.update import policy_update

    policy = PolicyModel(build_tiny_model(seed=2, processor=tiny_processor))
    trajs = [Trajectory(uid=f"t{i}", sample_uid="q", group=0, prompt_len=5, tokens=list(range(10 + i, 30 + i)),
                        loss_mask=[0] * 5 + [1] * 15, logprobs=[0.0] * 20, entropies=[0.0] * 20) for i in range(2)]
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    adv = [torch.full((20,), float("nan")), torch.full((20,), 1.0)]
    stats = policy_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), trajs, adv, masks,
                          fmt=AgentFormat(tiny_processor), d=Dist(), budget=10_000, temperature=1.0, clip_low=0.2,
                          clip_high=0.28, beta=0.0, agg="token-mean", epochs=1, grad_clip=1.0)
    assert stats["skipped"] == 1
    assert not math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"]), stats


# --------------------------------------------------------------------------------------------
# RL-step metrics of an in-process trainer (one process, no torchrun)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from axpo.config import load_config
    from axpo.trainer import Trainer

    out = tmp_path_factory.mktemp("inproc")
    cfg = load_config(SMOKE, [f"trainer.output_dir={out}", "pretrain.steps=0", "sft.steps=0", "rl.steps=1",
                              "trainer.evaluate=false", "trainer.tensorboard=false", "trainer.deterministic=false"])
    t = Trainer(cfg)
    yield t
    t.close()


def test_rl_tool_errors_are_the_steps_own(trainer):
    """The logged number is this step's training rollouts' errors (base and extra), counted from
    the step's own rollouts (axpo.rollout_stats; no cumulative loop counter that an evaluation
    could add to): the base rollouts' share is the diagnostics' count."""
    trainer._make_optimizer(trainer.cfg.rl)
    trainer.rl(0)
    row = [r for r in read_metrics(trainer.run_dir) if r["stage"] == "rl"][-1]
    assert row["tool_errors"] >= row["n_base_tool_errors"] >= 0
    if row["extra_rollouts"] == 0:
        assert row["tool_errors"] == row["n_base_tool_errors"]


def test_rl_step_without_an_update_does_not_leak_the_scheduler_warning(trainer):
    """All rollouts hit the turn limit (1 token, 1 turn) and are masked: no optimiser step, the
    schedule still advances, and torch's 'lr_scheduler.step() before optimizer.step()' warning
    (which the trainer means to silence) must not reach the user."""
    ro = trainer.cfg.rollout
    saved = ro.max_turn_tokens, ro.max_turns
    ro.max_turn_tokens, ro.max_turns = 1, 1
    try:
        trainer._make_optimizer(trainer.cfg.rl)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.rl(0)
    finally:
        ro.max_turn_tokens, ro.max_turns = saved
    row = [r for r in read_metrics(trainer.run_dir) if r["stage"] == "rl"][-1]
    assert row["trained_tokens"] == 0 and row["truncated_rate"] == 1.0
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]


def test_missing_checkpoint_named_by_the_library(tmp_path):
    """config_for_checkpoint / Trainer.load_policy (eval, trainer.init_from) name a path that is
    no checkpoint instead of failing inside DCP with an AssertionError (the eval command line
    checks first too: axpo/eval_cli.py)."""
    from axpo.trainer import config_for_checkpoint

    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'nope'}"):
        config_for_checkpoint(str(tmp_path / "nope"), None, [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is neither a DCP checkpoint folder .no .metadata. nor a Hugging Face"):
        config_for_checkpoint(str(tmp_path / "empty"), None, [])
