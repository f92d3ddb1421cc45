"""examples/custom_tool: a user tool (`codebook`) and reward (`code_match`) registered by a plugin
file and named in the config train end to end (SFT, evaluation, RL, export) with the public API."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_tool"


def test_plugin_tool_and_reward_through_the_registries():
    from axpo.config import load_config
    from axpo.registry import REWARDS
    from axpo.sources import build_sources
    from axpo.tools import ToolContext

    cfg = load_config(EXAMPLE / "config.yaml")     # imports plugin.py: the names now exist
    src = build_sources(cfg)
    assert src.tools.names == ["codebook"] and all(s.tools == ["codebook"] for s in src.train)
    _, ok = src.tools.execute('{"name": "codebook", "arguments": {"agent": "K7"}}', ToolContext())
    _, bad = src.tools.execute('{"name": "codebook", "arguments": {"agent": "Z"}}', ToolContext())
    assert ok.error is None and ok.text == "code of K7: 70" and bad.error == "not_found"
    assert src.reward_impl is REWARDS["code_match"]

    class T:   # the fields the reward reads from a trajectory
        finished, final_text = True, "The code is \\boxed{70}."

    t = T()
    sample = next(s for s in src.train if s.uid == "code-K7")
    assert src.reward_impl.score([sample], [t]) == [1.0]
    t.final_text = "maybe 70"
    assert src.reward_impl.score([sample], [t]) == [0.2]


def test_example_trains_end_to_end(tmp_path):
    """The example's own config, plus an evaluation during RL (trainer.eval_every=1: after RL step
    1; step 2 is the last, evaluated as after_rl)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "axpo" / "train.py"), "--config", str(EXAMPLE / "config.yaml"),
                        "--output-dir", str(out), "trainer.eval_every=1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [x for x in rows if x["stage"] == "rl"]
    assert [x["step"] for x in rl] == [1, 2]
    evals = json.loads((out / "evals.json").read_text())
    assert "pass@1" in evals["after_rl"] and "tool_use_rate" in evals["after_rl"]
    # The periodic evaluation: in evals.json and in RL step 1's metrics row, not in step 2's.
    assert list(evals) == ["after_sft", "rl_step_1", "after_rl"]
    assert rl[0]["eval/pass@1"] == evals["rl_step_1"]["pass@1"] and "eval/pass@1" not in rl[1]
    assert len([x for x in rows if x["stage"] == "eval"]) == 2
    assert (out / "hf" / "model.safetensors").exists()
