"""Tool call parsing, argument validation and dispatch.

The model writes `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; the rollout hands us
the text between the tags. Everything the model writes is untrusted: `ToolRegistry.execute` turns
every malformed call into a `ToolResult` with an `error` kind (counted in `error_counts`) and a
message naming the argument that was wrong, so the policy can read it and a rollout never crashes.

What "malformed" covers: text that is not JSON (or nested past the parser's recursion limit),
integer literals too long for Python's int conversion (over 4300 digits), NaN / Infinity, integers
outside 64 bits, numbers beyond float range, wrong types, arguments nested more than MAX_DEPTH
levels, strings longer than the registry's `max_string_chars`. Each becomes a `bad_arguments`
error naming the argument (e.g. `'bbox_2d[0]' is too large`).

Every call runs under a wall-clock limit: a tool's `timeout_s` attribute, else the registry's
`timeout_s` (a tool whose attribute is None bounds its own time, as the python sandbox does with
its subprocess). A call that overruns returns a `timeout` error; Python cannot stop a thread, so
the abandoned call finishes (or not) in a daemon thread and its result is dropped.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ToolResult:
    text: str                                            # what the model reads inside <tool_response>
    images: list["Image.Image"] = field(default_factory=list)  # new images (zoom crop, plots)
    error: str | None = None                             # None on success, else a short error kind


@dataclass
class ToolContext:
    # All images of the trajectory so far, in order (question images first, then tool-returned
    # ones). `img_idx` indexes this list; a tool's new image will get index len(images).
    images: list["Image.Image"] = field(default_factory=list)
    # The question this call answers (an axpo.tasks.Sample, or a user row): per-question tool
    # state, e.g. the hidden slots a tool opens, lives in `sample.meta`. None outside a rollout.
    sample: Any = None


@runtime_checkable
class Tool(Protocol):
    name: str

    def schema(self) -> dict: ...

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult: ...


def function_schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    """The OpenAI / Hugging Face `tools=` format that Qwen chat templates render into <tools>."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


def error_result(kind: str, message: str) -> ToolResult:
    return ToolResult(text=f"Error: {message}", error=kind)


# --------------------------------------------------------------------------------------------
# Hostile-JSON limits.

MAX_INT_DIGITS = 4000          # longer integer literals are not converted (Python's limit is 4300)
INT_BITS = 64                  # "integer" arguments must fit in a signed 64-bit integer
MAX_DEPTH = 32                 # nesting levels of lists/objects inside one argument
DEFAULT_MAX_STRING_CHARS = 65536
DEFAULT_MAX_TEXT_CHARS = 16384  # a tool's answer is cut to this many characters
DEFAULT_TIMEOUT_S = 60.0


class HugeInt:
    """A JSON integer literal with more than MAX_INT_DIGITS digits, kept unconverted (int() of it
    raises ValueError, and no tool argument needs one). Validation reports it as too large."""

    __slots__ = ("digits",)

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<integer with {self.digits} digits>"


def _parse_int(text: str):
    return int(text) if len(text) <= MAX_INT_DIGITS else HugeInt(text)


def loads(text: str):
    """json.loads that never raises on a long integer literal (see HugeInt); it still raises
    ValueError (JSONDecodeError) and RecursionError on other bad input."""
    return json.loads(text, parse_int=_parse_int)


def _json_default(o):
    return repr(o)


def show(value: Any, limit: int = 40) -> str:
    """A short JSON-like rendering of a model-written value for an error message; never raises."""
    try:
        if isinstance(value, str):
            text = json.dumps(value[:limit])
        else:
            text = json.dumps(value, default=_json_default)
    except (ValueError, TypeError, RecursionError, OverflowError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _name(text: str, limit: int = 40) -> str:
    """A model-written name (tool, argument) shortened for a message."""
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# Argument validation: the small JSON-schema subset our tools use (object properties, required,
# additionalProperties, type, items, minItems/maxItems). A full validator (jsonschema) would add a
# dependency for no gain, and its messages are too long for a small model to learn from.

_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "true or false", "array": "a list", "object": "an object"}


def _check_plain(value: Any, where: str, max_chars: int, depth: int = 0) -> str | None:
    """Checks for a value no schema describes (inside an object, an untyped list): bounded nesting,
    no unconvertible integer, no NaN/Infinity, no over-long string."""
    if depth > MAX_DEPTH:
        return f"'{where}' is nested too deeply (more than {MAX_DEPTH} levels)"
    if isinstance(value, HugeInt):
        return f"'{where}' is too large (an integer with {value.digits} digits)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"'{where}' must be a finite number, got {show(value)}"
    if isinstance(value, str) and len(value) > max_chars:
        return f"'{where}' is too long ({len(value)} characters, at most {max_chars})"
    if isinstance(value, list):
        for i, v in enumerate(value):
            err = _check_plain(v, f"{where}[{i}]", max_chars, depth + 1)
            if err:
                return err
    elif isinstance(value, dict):
        for k, v in value.items():
            err = _check_plain(v, f"{where}.{_name(str(k), 20)}", max_chars, depth + 1)
            if err:
                return err
    return None


def _check_type(value: Any, spec: dict, where: str, max_chars: int = DEFAULT_MAX_STRING_CHARS,
                depth: int = 0) -> tuple[Any, str | None]:
    """Return (possibly normalised value, error message or None)."""
    if not isinstance(spec, dict):
        spec = {}
    kind = spec.get("type")
    if isinstance(value, HugeInt) and kind in ("integer", "number"):
        return value, f"'{where}' is too large (an integer with {value.digits} digits)"
    ok = True
    if kind == "string":
        ok = isinstance(value, str)
        limit = spec.get("maxLength", max_chars)
        if ok and isinstance(limit, int) and len(value) > limit:
            return value, f"'{where}' is too long ({len(value)} characters, at most {limit})"
    elif kind == "integer":
        # JSON Schema counts 3.0 as an integer; bool is not a number in JSON.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -(2 ** (INT_BITS - 1)) <= value < 2 ** (INT_BITS - 1):
            return value, f"'{where}' is out of range (integers must fit in {INT_BITS} bits)"
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int):
            try:
                float(value)
            except OverflowError:
                return value, f"'{where}' is too large (beyond the range of a float)"
        ok = ok and math.isfinite(value)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "object":
        ok = isinstance(value, dict)
        if ok:
            err = _check_plain(value, where, max_chars, depth)
            if err:
                return value, err
    elif kind == "array":
        if not isinstance(value, list):
            ok = False
        else:
            n_min, n_max = spec.get("minItems"), spec.get("maxItems")
            if (n_min is not None and len(value) < n_min) or (n_max is not None and len(value) > n_max):
                count = n_min if n_min == n_max else f"{n_min}..{n_max}"
                return value, f"'{where}' must be a list of {count} items, got {len(value)}"
            items = spec.get("items")
            if depth >= MAX_DEPTH:
                return value, f"'{where}' is nested too deeply (more than {MAX_DEPTH} levels)"
            out = []
            for i, v in enumerate(value):
                if items:
                    v, err = _check_type(v, items, f"{where}[{i}]", max_chars, depth + 1)
                else:
                    err = _check_plain(v, f"{where}[{i}]", max_chars, depth + 1)
                if err:
                    return value, err
                out.append(v)
            value = out
    else:  # no or unknown type: anything JSON, within the plain limits
        err = _check_plain(value, where, max_chars, depth)
        if err:
            return value, err
    if not ok:
        return value, f"'{where}' must be {_TYPE_NAMES.get(kind, kind)}, got {show(value)}"
    return value, None


def validate_arguments(arguments: dict, parameters: dict,
                       max_chars: int = DEFAULT_MAX_STRING_CHARS) -> tuple[dict, str | None]:
    """Check `arguments` against a tool's parameters schema; fill defaults. Returns (args, error).
    Never raises for any JSON value (see the module docstring for the limits)."""
    props = parameters.get("properties", {})
    for name in parameters.get("required", []):
        if name not in arguments:
            return arguments, f"missing required argument '{name}'"
    if parameters.get("additionalProperties") is False:
        extra = sorted(set(arguments) - set(props))
        if extra:
            return arguments, f"unknown argument '{_name(extra[0])}' (allowed: {', '.join(props)})"
    out = {}
    for name, spec in props.items():
        if name in arguments:
            value, err = _check_type(arguments[name], spec, name, max_chars)
            if err:
                return arguments, err
            out[name] = value
        elif isinstance(spec, dict) and "default" in spec:
            out[name] = spec["default"]
    return out, None


def _safe_arguments(arguments: dict) -> dict:
    """The arguments kept on a rejected call (for the trajectory record): {} if keeping them could
    hurt later code (nesting beyond MAX_DEPTH, unconvertible integers)."""
    def hazard(v, depth):
        if depth > MAX_DEPTH or isinstance(v, HugeInt):
            return True
        if isinstance(v, list):
            return any(hazard(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return any(hazard(x, depth + 1) for x in v.values())
        return False
    return {} if hazard(arguments, 0) else arguments


# --------------------------------------------------------------------------------------------


class ToolRegistry:
    """The tools offered to the policy; parses, validates and runs calls, counting errors by kind.

    `timeout_s` bounds each call of a tool without its own `timeout_s` attribute (None or <= 0: no
    bound); `max_string_chars` bounds every string argument; `max_text_chars` cuts a tool's answer."""

    def __init__(self, tools: list[Tool], *, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 max_string_chars: int = DEFAULT_MAX_STRING_CHARS, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"duplicate tool name {tool.name!r}")
            self.tools[tool.name] = tool
        self.timeout_s = timeout_s
        self.max_string_chars = max_string_chars
        self.max_text_chars = max_text_chars
        self.call_counts: Counter[str] = Counter()    # successful + failed calls, by tool name
        self.error_counts: Counter[str] = Counter()   # by error kind
        self._lock = threading.Lock()                  # rollouts may run tools from worker threads

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self, names: list[str] | None = None) -> list[dict]:
        """Schemas for the chat template's `tools=`; `names` restricts to a sample's tools."""
        return [t.schema() for n, t in self.tools.items() if names is None or n in names]

    def subset(self, names: list[str]) -> "ToolRegistry":
        return ToolRegistry([self.tools[n] for n in names if n in self.tools], timeout_s=self.timeout_s,
                            max_string_chars=self.max_string_chars, max_text_chars=self.max_text_chars)

    def parse(self, call_text: str) -> ToolCall | ToolResult:
        if not isinstance(call_text, str):
            return error_result("bad_call", "the tool call must be text.")
        try:
            obj = loads(call_text.strip())
        except (ValueError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else \
                "nested too deeply" if isinstance(e, RecursionError) else "unreadable"
            return error_result("bad_json", f"the tool call is not valid JSON ({why}). "
                                'Write {"name": ..., "arguments": {...}}.')
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return error_result("bad_call", "the tool call must be a JSON object with a string 'name' "
                                "and an 'arguments' object.")
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit OpenAI-style JSON-encoded arguments
            try:
                args = loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                return error_result("bad_json", "'arguments' is a string that is not valid JSON.")
        if not isinstance(args, dict):
            return error_result("bad_call", "'arguments' must be a JSON object.")
        extra = sorted(set(obj) - {"name", "arguments"})
        if extra:
            return error_result("bad_call", f"unexpected key '{_name(extra[0])}' in the tool call; "
                                "use only 'name' and 'arguments'.")
        if obj["name"] not in self.tools:
            return error_result("unknown_tool", f"unknown tool '{_name(obj['name'])}'; available: "
                                f"{', '.join(self.tools)}.")
        return ToolCall(name=obj["name"], arguments=args)

    def execute(self, call_text: str, ctx: ToolContext) -> tuple[ToolCall | None, ToolResult]:
        """Parse, validate and run one call. Never raises for anything the model wrote (nor for a
        tool that crashes, hangs or returns garbage)."""
        try:
            return self._execute(call_text, ctx)
        except Exception as e:  # noqa: BLE001 - a bug here must not kill the rollout; counted apart
            result = error_result("registry_error", f"the call could not be handled ({type(e).__name__}).")
            self._count(None, result)
            return None, result

    def _execute(self, call_text: str, ctx: ToolContext) -> tuple[ToolCall | None, ToolResult]:
        parsed = self.parse(call_text)
        if isinstance(parsed, ToolResult):
            self._count(None, parsed)
            return None, parsed
        tool = self.tools[parsed.name]
        try:
            parameters = tool.schema()["function"]["parameters"]
        except Exception as e:  # noqa: BLE001 - a plugin's broken schema
            result = error_result("tool_crash", f"{parsed.name} failed: its schema is broken ({_describe(e)})")
            self._count(parsed.name, result)
            return parsed, result
        args, err = validate_arguments(parsed.arguments, parameters, self.max_string_chars)
        if err:
            parsed.arguments = _safe_arguments(parsed.arguments)
            result = error_result("bad_arguments", f"{parsed.name}: {err}.")
        else:
            parsed.arguments = args  # validated, defaults filled
            result = self._run(tool, parsed.name, args, ctx)
        self._count(parsed.name, result)
        return parsed, result

    def _run(self, tool: Tool, name: str, args: dict, ctx: ToolContext) -> ToolResult:
        """Call the tool under its wall-clock limit; turn a crash, an overrun or a malformed result
        into an error result."""
        timeout = getattr(tool, "timeout_s", self.timeout_s)
        box: dict = {}

        def call():
            try:
                box["result"] = tool(args, ctx)
            except BaseException as e:  # noqa: BLE001 - reported below
                box["error"] = e

        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            worker = threading.Thread(target=call, name=f"axpo-tool-{name}", daemon=True)
            worker.start()
            worker.join(timeout)
            if worker.is_alive():
                return error_result("timeout", f"{name} did not finish within {timeout:g} s and was stopped.")
        else:  # the tool bounds its own time
            call()
        if "error" in box:  # a tool bug must not kill the rollout; count it distinctly
            if not isinstance(box["error"], Exception):  # KeyboardInterrupt, SystemExit: not ours to eat
                raise box["error"]
            return error_result("tool_crash", f"{name} failed: {_describe(box['error'])}"[:300])
        return self._check_result(name, box.get("result"))

    def _check_result(self, name: str, result: Any) -> ToolResult:
        from PIL import Image

        if not isinstance(result, ToolResult):
            return error_result("tool_crash", f"{name} failed: it returned a {type(result).__name__}, "
                                "not a ToolResult.")
        if not isinstance(result.text, str) or not isinstance(result.images, list) or \
                not all(isinstance(im, Image.Image) for im in result.images) or \
                not (result.error is None or isinstance(result.error, str)):
            return error_result("tool_crash", f"{name} failed: it returned a malformed ToolResult "
                                "(text must be a string, images a list of PIL images).")
        if len(result.text) > self.max_text_chars:
            result.text = result.text[: self.max_text_chars] + " ... [truncated]"
        return result

    def _count(self, name: str | None, result: ToolResult) -> None:
        with self._lock:
            self.call_counts[name or "<unparsed>"] += 1
            if result.error:
                self.error_counts[result.error] += 1

    def reset_counts(self) -> tuple[Counter, Counter]:
        """Return (call_counts, error_counts) and start new counters (per training step)."""
        with self._lock:
            calls, errors = self.call_counts, self.error_counts
            self.call_counts, self.error_counts = Counter(), Counter()
        return calls, errors


def _describe(e: BaseException) -> str:
    """`Type: message` of an exception, even one whose __str__ raises."""
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001
        return type(e).__name__
