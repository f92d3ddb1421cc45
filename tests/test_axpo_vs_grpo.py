"""benchmarks/axpo_vs_grpo.py: the gate, the rates from summed counts, paired differences, and a
real two-arm run on the smoke model that writes each result once and skips it when run again."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import axpo_vs_grpo as avg  # noqa: E402


def test_rates_come_from_summed_counts():
    rows = [{"n_extra_successes": 1, "extra_rollouts": 10, "n_triggered_groups": 2, "n_groups": 4,
             "n_zero_var_before": 3, "n_zero_var_after": 1, "n_base_rollouts": 32, "base_tokens": 5, "extra_tokens": 1},
            {"n_extra_successes": 0, "extra_rollouts": 0, "n_triggered_groups": 0, "n_groups": 4,
             "n_zero_var_before": 4, "n_zero_var_after": 4, "n_base_rollouts": 32, "base_tokens": 5, "extra_tokens": 0}]
    c = avg.rl_counts(rows)
    assert c["resample_success"] == 0.1            # not the mean of 0.1 and an undefined 0/0
    assert c["trigger_rate"] == 2 / 8 and c["zero_var_before"] == 7 / 8 and c["zero_var_after"] == 5 / 8
    assert avg.rl_counts(rows, first=1)["trigger_rate"] == 0.5
    assert math.isnan(avg.rl_counts(rows[1:])["resample_success"])


def test_gate_bounds():
    good = {"lockers/right_call_rate": 0.11, "lockers/accuracy_after_right_call": 0.9,
            "lockers/accuracy_without_tool": 0.17, "lockers/tool_use_rate": 0.4}
    assert all(r[3] for r in avg.gate("lockers", good, 6, None, 5))
    for key, bad in (("right_call_rate", 0.3), ("accuracy_after_right_call", 0.5),
                     ("accuracy_without_tool", 0.5), ("tool_use_rate", 0.9)):
        rows = avg.gate("lockers", {**good, f"lockers/{key}": bad}, 6, None, 5)
        assert [r[0] for r in rows if not r[3]] == [f"after SFT: {key}"]
    rl = [{"n_extra_successes": 1, "extra_rollouts": 16, "n_triggered_groups": 1, "n_groups": 8}]
    rows = avg.gate("lockers", good, 6, [rl], 5)
    assert [r[0] for r in rows if not r[3]] == ["AXPO steps 1-5 (1 seed): resample_success",
                                                "AXPO steps 1-5 (1 seed): trigger_rate"]
    more = [{"n_extra_successes": 3, "extra_rollouts": 16, "n_triggered_groups": 3, "n_groups": 8}] * 6
    rows = avg.gate("lockers", good, 6, [rl, more], 5)   # counts summed over seeds, first 5 steps each
    assert rows[-2][1] == (1 + 15) / (16 + 80) and rows[-1][1] == (1 + 15) / (8 + 40) and rows[-2][0].endswith("(2 seeds): resample_success")
    assert not avg.gate("lockers", {}, 6, None, 5)[0][3]   # a missing number fails


def test_paired_differences():
    a = [{"seed": 0, "v": 0.5}, {"seed": 1, "v": 0.4}, {"seed": 2, "v": 0.9}]
    b = [{"seed": 0, "v": 0.3}, {"seed": 1, "v": 0.5}]
    assert avg.paired(a, b, lambda r: r["v"]) == "+0.050 ± 0.212 (1/2 > 0)"


def test_two_arms_on_the_smoke_model_resume_by_result(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "axpo_vs_grpo.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
           "--seeds", "0", "--arms", "grpo", "axpo", "--ignore-gate", "--gate-steps", "2", "--nproc", "1",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
           "--extra", "data.tasks=[lockers]", "tools.enabled=[open_locker]", "data.eval_size=4",
           "trainer.checkpoint_every=100"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "out" / "axpo_vs_grpo.md").read_text()
    assert "## Gate: FAILED (run with --ignore-gate" in report or "## Gate: passed" in report
    assert "| axpo - grpo |" in report and "after SFT: right_call_rate" in report
    res = json.loads((tmp_path / "work" / "skill0.1_axpo_s0" / "result.json").read_text())
    assert len(res["train_accuracy"]) == 2 and "pass@1" in res["eval"]
    evals = json.loads((tmp_path / "work" / "skill0.1_axpo_s0" / "evals.json").read_text())
    assert "after_sft" not in evals                      # evaluated once, in the SFT run
    assert (tmp_path / "out" / "axpo_vs_grpo_tool_use.png").stat().st_size > 0
    logs = sorted(p.name for p in (tmp_path / "work").glob("*.log"))   # one log per run, none shared
    assert logs == ["pretrain.log", "sft_skill0.1.log", "skill0.1_axpo_s0.log", "skill0.1_grpo_s0.log"]
    # Run again: nothing is trained (each result.json is read back).
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and " min, Pass@1" not in r2.stdout and "SFT at argument skill" not in r2.stdout
    # Another config: a finished run is not reused as if it were this one's.
    r3 = subprocess.run(cmd + ["rl.lr=0.5"], capture_output=True, text=True, timeout=300)
    assert r3.returncode != 0 and "finished with another config (rl.lr: " in r3.stderr
