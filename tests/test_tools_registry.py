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


# -- hostile arguments (issue #18, H4) -------------------------------------------------------

def _text(name, args_json):
    return '{"name": "%s", "arguments": %s}' % (name, args_json)


class OptionsTool:
    """A plugin-style tool with an untyped object argument (nothing in its schema bounds it)."""

    name = "opts"

    def schema(self):
        return {"type": "function", "function": {"name": "opts", "description": "", "parameters": {
            "type": "object", "properties": {"options": {"type": "object"}, "any": {}}}}}

    def __call__(self, arguments, ctx):
        return ToolResult(text="ok")


_DEEP = "[" * 200 + "1" + "]" * 200


@pytest.mark.parametrize("name, args_json, mentions", [
    ("search", '{"query": "a", "max_results": %s}' % ("9" * 5000), "'max_results' is too large"),
    ("search", '{"query": "a", "max_results": -%s}' % ("9" * 5000), "'max_results' is too large"),
    ("search", '{"query": "a", "max_results": %d}' % 2**64, "'max_results' is out of range"),
    ("search", '{"query": "a", "max_results": 1e300}', "'max_results' is out of range"),
    ("search", '{"query": "a", "max_results": NaN}', "'max_results' must be an integer, got NaN"),
    ("search", '{"query": "a", "max_results": Infinity}', "'max_results' must be an integer, got Infinity"),
    ("search", '{"query": "%s"}' % ("ab " * 40000), "'query' is too long"),
    ("search", '{"query": 5}', "'query' must be a string"),
    ("search", '{"query": %s}' % _DEEP, "'query' must be a string"),
    ("image_zoom_in", '{"bbox_2d": [1%s, 0, 5, 5]}' % ("0" * 400), "'bbox_2d[0]' is too large"),
    ("image_zoom_in", '{"bbox_2d": [%s, 0, 5, 5]}' % ("9" * 4500), "'bbox_2d[0]' is too large"),
    ("image_zoom_in", '{"bbox_2d": [0, -Infinity, 5, 5]}', "'bbox_2d[1]' must be a number, got -Infinity"),
    ("image_zoom_in", '{"bbox_2d": [0, 0, 1e400, 5]}', "'bbox_2d[2]' must be a number, got Infinity"),
    ("image_zoom_in", '{"bbox_2d": [0, 0, 5, %s]}' % _DEEP, "'bbox_2d[3]' must be a number"),
    ("image_zoom_in", '{"bbox_2d": [0, 0, 5, 5], "img_idx": %s}' % ("1" * 4400), "'img_idx' is too large"),
    ("image_zoom_in", '{"bbox_2d": [0, 0, 5, 5], "label": ["x"]}', "'label' must be a string"),
    ("opts", '{"options": {"a": %s}}' % _DEEP, "'options.a[0]"),
    ("opts", '{"options": {"a": [1, %s]}}' % ("7" * 5000), "'options.a[1]' is too large"),
    ("opts", '{"options": {"a": NaN}}', "'options.a' must be a finite number"),
    ("opts", '{"any": %s}' % _DEEP, "'any[0]"),
])
def test_hostile_arguments_are_errors_naming_the_argument(name, args_json, mentions):
    reg = ToolRegistry([*build_tools(["image_zoom_in", "search"], documents=[Snippet("a", "b")]).tools.values(),
                        OptionsTool()])
    call, result = reg.execute(_text(name, args_json), ctx())
    assert result.error == "bad_arguments" and call is not None and call.name == name
    assert mentions in result.text, result.text
    assert reg.error_counts == {"bad_arguments": 1}
    json.dumps(call.arguments, default=repr)   # what is kept of the call is still printable
    if "nested" in result.text or "too large (an integer" in result.text:
        assert call.arguments == {}


def test_nesting_beyond_the_parser_is_bad_json():
    reg = build_tools(["search"], documents=[Snippet("a", "b")])
    call, result = reg.execute(_text("search", '{"query": %s}' % ("[" * 100000)), ctx())
    assert call is None and result.error == "bad_json"


# JSON-ish text with hostile literals, for every built-in tool (python included).
_LITERAL = st.one_of(
    st.integers().map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "9" * 5000,
                     "-" + "9" * 4301, "true", "false", "null", '"\\ud800"', '"<|image_pad|>"', "1.5e308",
                     str(2**63), str(-(2**63) - 1), _DEEP]),
    st.text(max_size=8).map(json.dumps))
_VALUE = st.recursive(
    _LITERAL,
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.dictionaries(st.text(max_size=5).map(json.dumps), inner, max_size=3).map(
        lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"),
    max_leaves=8)
_ARG_NAMES = {"image_zoom_in": ["bbox_2d", "label", "img_idx"], "search": ["query", "max_results"],
              "python": ["code"]}


def _call_texts(tool):
    args = st.dictionaries(st.sampled_from(_ARG_NAMES[tool] + ["x"]).map(json.dumps), _VALUE, max_size=3).map(
        lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}")
    whole = st.builds(lambda a: _text(tool, a), args)
    # Also cut and spliced: what a model emits when it runs out of tokens or loses the format.
    return st.one_of(whole, st.tuples(whole, st.integers(0, 200)).map(lambda t: t[0][: t[1]]),
                     st.builds(lambda a, b: a + b, whole, st.text(max_size=10)))


def _assert_contained(reg, text):
    reg.reset_counts()
    call, result = reg.execute(text, ctx())
    assert isinstance(result, ToolResult) and isinstance(result.text, str)
    assert result.error != "registry_error", result.text   # no path through the registry's own fallback
    assert (result.error is None) == (sum(reg.error_counts.values()) == 0)
    if result.error == "bad_arguments":
        assert any(f"'{a}" in result.text for a in _ARG_NAMES[call.name] + ["x"]), result.text
    if call is not None:
        json.dumps(call.arguments, default=repr)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(_call_texts("image_zoom_in"), _call_texts("search"), _VALUE))
def test_execute_never_raises_on_hostile_json(text):
    _assert_contained(build_tools(["image_zoom_in", "search"], documents=[Snippet("a", "b c")]), text)


_PYTHON = None


@settings(max_examples=40, deadline=None)
@given(text=_call_texts("python"))
def test_execute_never_raises_on_hostile_json_python(text):
    global _PYTHON
    if _PYTHON is None:
        _PYTHON = build_tools(["python"])
    _assert_contained(_PYTHON, text)


# -- the hard time limit around every call ---------------------------------------------------

class SlowTool:
    name = "slow"

    def __init__(self, seconds, **attrs):
        self.seconds, self.thread = seconds, None
        self.__dict__.update(attrs)

    def schema(self):
        return {"type": "function", "function": {"name": "slow", "description": "",
                                                 "parameters": {"type": "object", "properties": {}}}}

    def __call__(self, arguments, ctx):
        import threading
        import time

        self.thread = threading.current_thread()
        time.sleep(self.seconds)
        return ToolResult(text="done")


def test_a_hanging_tool_times_out():
    import time

    for reg in (ToolRegistry([SlowTool(30, timeout_s=0.3)]),          # the tool's own limit
                ToolRegistry([SlowTool(30)], timeout_s=0.3)):          # the registry's default
        t0 = time.monotonic()
        call, r = reg.execute('{"name": "slow", "arguments": {}}', ctx())
        assert time.monotonic() - t0 < 5
        assert call.name == "slow" and r.error == "timeout" and "0.3 s" in r.text
        assert reg.error_counts == {"timeout": 1}


def test_fast_tools_are_not_affected_and_self_timed_tools_run_inline():
    import threading

    tool = SlowTool(0.0)
    _, r = ToolRegistry([tool], timeout_s=5).execute('{"name": "slow", "arguments": {}}', ctx())
    assert r.error is None and r.text == "done" and tool.thread is not threading.current_thread()
    inline = SlowTool(0.0, timeout_s=None)            # bounds its own time (the python sandbox)
    _, r = ToolRegistry([inline], timeout_s=5).execute('{"name": "slow", "arguments": {}}', ctx())
    assert r.error is None and inline.thread is threading.current_thread()
    from axpo.tools.base import DEFAULT_TIMEOUT_S
    assert ToolRegistry([]).timeout_s == DEFAULT_TIMEOUT_S > 0


@pytest.mark.parametrize("returned", [None, "text", ToolResult(text=None), ToolResult(text="x", images=["no"]),
                                      ToolResult(text="x", images=None)])
def test_a_malformed_tool_result_is_a_tool_crash(returned):
    class Bad:
        name = "bad"

        def schema(self):
            return {"type": "function", "function": {"name": "bad", "description": "",
                                                     "parameters": {"type": "object", "properties": {}}}}

        def __call__(self, arguments, ctx):
            return returned

    call, r = ToolRegistry([Bad()]).execute('{"name": "bad", "arguments": {}}', ctx())
    assert call.name == "bad" and r.error == "tool_crash" and isinstance(r.text, str)


def test_long_tool_text_is_cut():
    class Chatty:
        name = "chatty"

        def schema(self):
            return {"type": "function", "function": {"name": "chatty", "description": "",
                                                     "parameters": {"type": "object", "properties": {}}}}

        def __call__(self, arguments, ctx):
            return ToolResult(text="y" * 10**6)

    _, r = ToolRegistry([Chatty()], max_text_chars=1000).execute('{"name": "chatty", "arguments": {}}', ctx())
    assert r.error is None and len(r.text) < 1100 and r.text.endswith("[truncated]")
