"""Extension points (axpo/registry.py): tools, rewards and tasks by name; plugins imported by path."""

import math
import textwrap

import pytest

import axpo
from axpo.registry import REWARDS, TOOLS, RegistryError, Registry, import_plugins
from axpo.tools import ToolContext, build_tools, function_schema
from axpo.tools.base import ToolResult


class Echo:
    name = "echo_test"

    def __init__(self, cfg=None):
        self.cfg = cfg

    def schema(self):
        return function_schema(self.name, "Echo a word.", {"word": {"type": "string"}}, ["word"])

    def __call__(self, arguments, ctx):
        return ToolResult(text=arguments["word"].upper())


@pytest.fixture
def echo_registered():
    axpo.register_tool("echo_test", Echo)
    yield
    TOOLS.unregister("echo_test")


def test_registered_tool_is_built_and_called_through_the_registry(echo_registered):
    reg = build_tools(["echo_test", "image_zoom_in"])
    assert reg.names == ["echo_test", "image_zoom_in"]
    assert isinstance(reg.tools["echo_test"].cfg, axpo.tools.ToolSetConfig)   # the factory got cfg
    call, res = reg.execute('{"name": "echo_test", "arguments": {"word": "hi"}}', ToolContext())
    assert res.error is None and res.text == "HI"
    _, bad = reg.execute('{"name": "echo_test", "arguments": {"word": 3}}', ToolContext())
    assert bad.error == "bad_arguments" and "'word'" in bad.text


def test_unknown_and_duplicate_names_are_clear_errors(echo_registered):
    with pytest.raises(ValueError, match=r"unknown tool 'calculator'; registered: .*echo_test"):
        build_tools(["calculator"])
    with pytest.raises(ValueError, match="already registered"):
        axpo.register_tool("echo_test", lambda: Echo())
    axpo.register_tool("echo_test", Echo, override=True)   # explicit replacement is allowed


def test_tool_name_must_match_its_registration():
    axpo.register_tool("echo_alias", Echo)
    try:
        with pytest.raises(ValueError, match="must agree"):
            build_tools(["echo_alias"])
    finally:
        TOOLS.unregister("echo_alias")


def test_reward_functions_per_trajectory_and_batched():
    import axpo.rewards  # noqa: F401  (registers "verify")

    assert "verify" in REWARDS
    axpo.register_reward("len_test", lambda s, t: float(len(t)))
    axpo.register_reward("batch_test", lambda ss, ts: [1.0] * len(ts), batched=True)
    axpo.register_reward("short_test", lambda ss, ts: [1.0], batched=True)
    axpo.register_reward("nan_test", lambda s, t: math.nan)
    try:
        assert REWARDS["len_test"].score([None, None], ["ab", "abc"]) == [2.0, 3.0]
        assert REWARDS["batch_test"].score([None] * 3, ["a"] * 3) == [1.0, 1.0, 1.0]
        with pytest.raises(ValueError, match="returned 1 scores for 2"):
            REWARDS["short_test"].score([None] * 2, ["a"] * 2)
        with pytest.raises(ValueError, match="finite number"):
            REWARDS["nan_test"].score([None], ["a"])
    finally:
        for n in ("len_test", "batch_test", "short_test", "nan_test"):
            REWARDS.unregister(n)


def test_builtin_tasks_are_in_the_task_registry():
    from axpo.tasks import BUILTIN_TASKS, TASKS, task_config

    assert set(BUILTIN_TASKS) <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'; registered: perception"):
        task_config("nope")


def test_plugin_file_is_imported_and_registers(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(textwrap.dedent("""
        import axpo
        axpo.register_reward("plugin_test", lambda sample, traj: 0.5)
    """))
    try:
        import_plugins(["my_plugin.py"], base=tmp_path)
        assert REWARDS["plugin_test"].score([None], [None]) == [0.5]
    finally:
        REWARDS.unregister("plugin_test")
    with pytest.raises(FileNotFoundError, match="plugins: nope.py: no such file"):
        import_plugins(["nope.py"], base=tmp_path)


def test_registry_is_a_read_only_mapping():
    r = Registry("thing")
    r.register("a", 1)
    assert dict(r) == {"a": 1} and r.get("b", None) is None
    with pytest.raises(RegistryError):
        r["b"]
