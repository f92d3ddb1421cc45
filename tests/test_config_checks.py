"""The config is checked when it is loaded, before any stage runs: typed choices, ranges, cross-field
rules, data files, registered names; each error names the field and where the value came from."""

import subprocess
import sys
from pathlib import Path

import pytest

from axpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.mark.parametrize("override, message", [
    ("rl.step=2", "command line: unknown config key rl.step; valid keys here: checkpoint_every, lr"),
    ("rollout.group_size=0", "command line: rollout.group_size = 0: must be >= 2 for RL"),
    ("rollout.group_size=1", "command line: rollout.group_size = 1: must be >= 2 for RL"),
    ("algo.clip_low=-1", "command line: algo.clip_low = -1.0: must be in [0, 1)"),
    ("algo.credit=sofft", "command line: algo.credit: 'sofft' is not one of 'soft', 'subgroup', 'tree'"),
    ("rollout.temperature=0", "command line: rollout.temperature = 0.0: must be > 0"),
    ("rollout.top_p=1.5", "rollout.top_p = 1.5: must be in (0, 1]"),
    ("algo.selection=max", "algo.selection: 'max' is not one of 'window_entropy'"),
    ("model.dtype=fp8", "model.dtype: 'fp8' is not one of 'float32', 'bfloat16', 'float16'"),
    ("rollout.engine=sglang", "rollout.engine: 'sglang' is not one of 'builtin', 'vllm'"),
    ("optim.lr=0", "optim.lr = 0.0: must be > 0"),
    ("rollout.engine=vllm", "rollout.engine = 'vllm': needs vLLM, which is not installed here; install the "
                            "optional extra: `pip install -e .[vllm]`"),   # main venv: no vLLM (see test_engine_select)
    ("algo.ppo_epochs=0", "algo.ppo_epochs = 0: must be >= 1"),
    ("rollout.max_total_tokens=10", "rollout.max_total_tokens = 10: must be >= rollout.max_turn_tokens"),
    ("algo.brute_force=true", "algo.brute_force = True: brute force spends AXPO's extra budget"),
    ("algo.prefix_weight=once", None),
    ("tools.enabled=[calculator]", "command line: tools.enabled[0] = 'calculator': unknown tool; registered: "
                                   "image_zoom_in, python, search"),
    ("data.reward=nope", "data.reward = 'nope': unknown reward; registered: verify"),
    ("data.tasks=[lockers2]", "data.tasks[0] = 'lockers2': unknown task; registered: perception"),
    ("data.train_file=/nonexistent.jsonl", "data.train_file = '/nonexistent.jsonl': no such file"),
    ("plugins=[missing_plugin.py]", "plugins = ['missing_plugin.py']: FileNotFoundError"),
    ("trainer.eval_every=-1", "command line: trainer.eval_every = -1: must be >= 0 (0: no evaluation during RL)"),
    ("trainer.log_every=1", "command line: unknown config key trainer.log_every"),   # removed: it did nothing
])
def test_bad_values_are_errors_naming_field_and_source(override, message):
    if message is None:   # valid alone
        load_config(SMOKE, [override])
        with pytest.raises(ConfigError, match="algo.prefix_weight = 'once': 'once' is for soft/subgroup"):
            load_config(SMOKE, [override, "algo.credit=tree"])
        return
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert message in str(e.value), str(e.value)


def test_errors_in_the_file_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rl:\n  step: 3\nrollout:\n  temperature: 0\n")
    with pytest.raises(ConfigError, match=f"{f}: unknown config key rl.step"):
        load_config(f)
    f.write_text("rollout:\n  temperature: 0\n")
    with pytest.raises(ConfigError, match=f"{f}: rollout.temperature = 0.0: must be > 0"):
        load_config(f)
    # The same field set on the command line is reported as the command line's.
    with pytest.raises(ConfigError, match="command line: rollout.temperature = -1.0"):
        load_config(f, ["rollout.temperature=-1"])


def test_all_range_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["rollout.temperature=0", "algo.clip_low=2"])
    assert str(e.value).startswith("2 config errors:")


@pytest.mark.parametrize("key", ["train_file", "eval_file", "sft_file"])
def test_empty_data_files_are_errors_before_any_stage(tmp_path, key):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(ConfigError, match=f"data.{key} = '{f}': the file is empty"):
        load_config(SMOKE, [f"data.{key}={f}"])


def test_defaults_and_shipped_configs_pass():
    for cfg in (None, SMOKE, ROOT / "configs" / "default.yaml"):
        load_config(cfg)
    # The 8B config names files on the user's machine; everything else in it must pass.
    load_config(ROOT / "configs" / "qwen3vl-8b-axpo.yaml", check=False)


def test_train_py_reports_a_bad_config_in_one_line_before_any_stage(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "axpo" / "train.py"), "--config", str(SMOKE),
                        "--output-dir", str(tmp_path / "run"), "rollout.temperature=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: command line: rollout.temperature = 0.0: must be > 0 (RL samples, "
                                "and its log-probs divide by the temperature)")
    assert not (tmp_path / "run").exists()   # nothing ran, nothing was written
