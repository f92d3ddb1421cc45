"""Malformed calls of every kind come back as counted error results, never as exceptions."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from axpo.tools import TOOL_NAMES, ToolContext, ToolRegistry, ToolResult, build_tools, tool_set_config
from axpo.tools.search import Snippet


@pytest.fixture(scope="module")
def registry():
    return build_tools(["image_zoom_in", "search"], documents=[Snippet("a", "b c")])


def ctx():
    return ToolContext(images=[Image.new("RGB", (64, 64))])


@pytest.mark.parametrize("text, kind", [
    ("not json", "bad_json"),
    ('{"name": "search", "arguments": {"query": "x"}', "bad_json"),
    ("", "bad_json"),
    ("[1, 2]", "bad_call"),
    ('{"arguments": {}}', "bad_call"),
    ('{"name": 3, "arguments": {}}', "bad_call"),
    ('{"name": "search", "arguments": [1]}', "bad_call"),
    ('{"name": "search", "arguments": "{not json"}', "bad_json"),
    ('{"name": "search", "arguments": {"query": "x"}, "extra": 1}', "bad_call"),
    ('{"name": "web_browser", "arguments": {}}', "unknown_tool"),
    ('{"name": "python", "arguments": {"code": "1"}}', "unknown_tool"),  # not offered here
])
def test_malformed_calls_are_errors(registry, text, kind):
    registry.reset_counts()
    call, result = registry.execute(text, ctx())
    assert call is None and isinstance(result, ToolResult)
    assert result.error == kind and result.text.startswith("Error:")
    assert registry.error_counts == {kind: 1}


def test_parse_accepts_qwen_format_and_string_arguments(registry):
    call = registry.parse('\n{"name": "search", "arguments": {"query": "b"}}\n')
    assert call.name == "search" and call.arguments == {"query": "b"}
    call = registry.parse('{"name": "search", "arguments": "{\\"query\\": \\"b\\"}"}')
    assert call.arguments == {"query": "b"}


def test_counts_by_kind_and_reset(registry):
    registry.reset_counts()
    registry.execute("garbage", ctx())
    registry.execute('{"name": "nope", "arguments": {}}', ctx())
    registry.execute('{"name": "search", "arguments": {"query": "b"}}', ctx())
    registry.execute('{"name": "image_zoom_in", "arguments": {"bbox_2d": [5, 5, 1, 1]}}', ctx())
    calls, errors = registry.reset_counts()
    assert errors == {"bad_json": 1, "unknown_tool": 1, "empty_box": 1}
    assert calls["search"] == 1 and calls["image_zoom_in"] == 1 and calls["<unparsed>"] == 2
    assert registry.error_counts == {}


def test_a_crashing_tool_is_contained():
    class Broken:
        name = "broken"

        def schema(self):
            return {"type": "function", "function": {"name": "broken", "description": "",
                                                     "parameters": {"type": "object", "properties": {}}}}

        def __call__(self, arguments, ctx):
            raise RuntimeError("bug")

    reg = ToolRegistry([Broken()])
    call, r = reg.execute('{"name": "broken", "arguments": {}}', ctx())
    assert call.name == "broken" and r.error == "tool_crash"


def test_schemas_are_function_schemas():
    reg = build_tools(list(TOOL_NAMES), documents=[Snippet("a", "b")])
    schemas = reg.schemas()
    assert [s["function"]["name"] for s in schemas] == list(TOOL_NAMES)
    for s in schemas:
        assert s["type"] == "function" and s["function"]["parameters"]["type"] == "object"
        json.dumps(s)
    assert [s["function"]["name"] for s in reg.schemas(["search"])] == ["search"]


def test_build_tools_accepts_flat_run_config():
    from axpo.config import ToolsConfig

    cfg = tool_set_config(ToolsConfig(python_timeout_s=2.0, python_memory_mb=256, zoom_max_pixels=128 * 128,
                                      search_max_results=3))
    assert cfg.python.wall_timeout_s == 2.0 and cfg.python.memory_mb == 256 and cfg.python.cpu_time_s == 2
    assert cfg.zoom.max_pixels == 128 * 128 and cfg.search.default_results == 3
    with pytest.raises(ValueError, match="unknown tool"):
        build_tools(["teleport"])


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.text(max_size=80),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                 max_leaves=12).map(lambda v: json.dumps(v)),
    st.builds(lambda name, args: json.dumps({"name": name, "arguments": args}),
              st.sampled_from(["image_zoom_in", "search", "x"]),
              st.dictionaries(st.sampled_from(["bbox_2d", "img_idx", "label", "query", "max_results", "z"]),
                              st.one_of(st.integers(-2000, 2000), st.floats(allow_nan=True), st.text(max_size=5),
                                        st.lists(st.floats(-10, 1100), max_size=6), st.none()), max_size=4)),
))
def test_never_raises_on_arbitrary_model_output(text):
    reg = build_tools(["image_zoom_in", "search"], documents=[Snippet("a", "b c")])
    call, result = reg.execute(text, ctx())
    assert isinstance(result, ToolResult)
    assert (result.error is None) == (sum(reg.error_counts.values()) == 0)
