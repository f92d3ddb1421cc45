"""Tool call parsing, argument validation and dispatch.

The model writes `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; the rollout hands us
the text between the tags. Everything the model writes is untrusted: `ToolRegistry.execute` turns
every malformed call into a `ToolResult` with an `error` kind (counted in `error_counts`) and a
message naming the argument that was wrong, so the policy can read it and a rollout never crashes.
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
# Argument validation: the small JSON-schema subset our tools use (object properties, required,
# additionalProperties, type, items, minItems/maxItems). A full validator (jsonschema) would add a
# dependency for no gain, and its messages are too long for a small model to learn from.

_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "true or false", "array": "a list", "object": "an object"}


def _check_type(value: Any, spec: dict, where: str) -> tuple[Any, str | None]:
    """Return (possibly normalised value, error message or None)."""
    kind = spec.get("type")
    ok = True
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "integer":
        # JSON Schema counts 3.0 as an integer; bool is not a number in JSON.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "object":
        ok = isinstance(value, dict)
    elif kind == "array":
        if not isinstance(value, list):
            ok = False
        else:
            n_min, n_max = spec.get("minItems"), spec.get("maxItems")
            if (n_min is not None and len(value) < n_min) or (n_max is not None and len(value) > n_max):
                count = n_min if n_min == n_max else f"{n_min}..{n_max}"
                return value, f"'{where}' must be a list of {count} items, got {len(value)}"
            items = spec.get("items")
            if items:
                out = []
                for i, v in enumerate(value):
                    v, err = _check_type(v, items, f"{where}[{i}]")
                    if err:
                        return value, err
                    out.append(v)
                value = out
    if not ok:
        return value, f"'{where}' must be {_TYPE_NAMES.get(kind, kind)}, got {json.dumps(value)[:40]}"
    return value, None


def validate_arguments(arguments: dict, parameters: dict) -> tuple[dict, str | None]:
    """Check `arguments` against a tool's parameters schema; fill defaults. Returns (args, error)."""
    props = parameters.get("properties", {})
    for name in parameters.get("required", []):
        if name not in arguments:
            return arguments, f"missing required argument '{name}'"
    if parameters.get("additionalProperties") is False:
        extra = sorted(set(arguments) - set(props))
        if extra:
            return arguments, f"unknown argument '{extra[0]}' (allowed: {', '.join(props)})"
    out = {}
    for name, spec in props.items():
        if name in arguments:
            value, err = _check_type(arguments[name], spec, name)
            if err:
                return arguments, err
            out[name] = value
        elif "default" in spec:
            out[name] = spec["default"]
    return out, None


# --------------------------------------------------------------------------------------------


class ToolRegistry:
    """The tools offered to the policy; parses, validates and runs calls, counting errors by kind."""

    def __init__(self, tools: list[Tool]):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"duplicate tool name {tool.name!r}")
            self.tools[tool.name] = tool
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
        return ToolRegistry([self.tools[n] for n in names if n in self.tools])

    def parse(self, call_text: str) -> ToolCall | ToolResult:
        try:
            obj = json.loads(call_text.strip())
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            return error_result("bad_json", f"the tool call is not valid JSON ({why}). "
                                'Write {"name": ..., "arguments": {...}}.')
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return error_result("bad_call", "the tool call must be a JSON object with a string 'name' "
                                "and an 'arguments' object.")
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit OpenAI-style JSON-encoded arguments
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return error_result("bad_json", "'arguments' is a string that is not valid JSON.")
        if not isinstance(args, dict):
            return error_result("bad_call", "'arguments' must be a JSON object.")
        extra = sorted(set(obj) - {"name", "arguments"})
        if extra:
            return error_result("bad_call", f"unexpected key '{extra[0]}' in the tool call; "
                                "use only 'name' and 'arguments'.")
        if obj["name"] not in self.tools:
            return error_result("unknown_tool", f"unknown tool '{obj['name'][:40]}'; available: "
                                f"{', '.join(self.tools)}.")
        return ToolCall(name=obj["name"], arguments=args)

    def execute(self, call_text: str, ctx: ToolContext) -> tuple[ToolCall | None, ToolResult]:
        """Parse, validate and run one call. Never raises for anything the model wrote."""
        parsed = self.parse(call_text)
        if isinstance(parsed, ToolResult):
            self._count(None, parsed)
            return None, parsed
        tool = self.tools[parsed.name]
        args, err = validate_arguments(parsed.arguments, tool.schema()["function"]["parameters"])
        if err:
            result = error_result("bad_arguments", f"{parsed.name}: {err}.")
        else:
            parsed.arguments = args  # validated, defaults filled
            try:
                result = tool(args, ctx)
            except Exception as e:  # a tool bug must not kill the rollout; count it distinctly
                result = error_result("tool_crash", f"{parsed.name} failed: {type(e).__name__}: {e}"[:300])
        self._count(parsed.name, result)
        return parsed, result

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
