"""User datasets: question files for RL/evaluation and chat transcripts for SFT.

Question rows (JSONL, a JSON array, or parquet):
    {"images": [path | data URI | bytes | {"bytes": ..., "path": ...}, ...], "question": str,
     "answer": str | number, "tools": [tool names], "answer_type": "exact" | "numeric" | "choice",
     "choices": [str, ...], "id": str | int, "task": str}
    (`images`, `tools`, `answer_type`, `choices`, `id`, `task` optional). A numeric answer must read
    as a finite number; a choice answer must be one of the choices or its letter (A, B, ...).
SFT rows:
    {"messages": [Hugging Face chat messages] (or that list as a JSON string), "images": [...],
     "tools": [tool names]}
    with at least one user and one assistant turn; an assistant's `tool_calls` entries are
    {"type": "function", "function": {"name": str, "arguments": object | JSON-object string}}
    (or {"name", "arguments"} directly), naming one of the row's tools.

`tools`: missing = the run's default set (`default_tools`, all registered tools in a run),
`[]` = no tools, a name the registry does not know (`known_tools`) = a bad row. An image string is
a path (relative paths resolve against the data file's folder) or a `data:image/...;base64,` URI.

Every bad row raises `DataError` naming the file, the 1-based line of a JSON-lines file (blank
lines counted, so it is the line an editor shows) or the 1-based row of a parquet file or JSON
array, and the field; with on_bad_row="skip" it is skipped and counted instead. Ids must be unique
within a file (a duplicate names both lines): rewards look questions up by id.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from axpo.tasks.base import LETTERS, Demonstration, Sample, answer_index, parse_number

ANSWER_TYPES = ("exact", "numeric", "choice")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad row in a user data file; names the file, the 1-based line (or row) and the field.
    `line` is None for a problem with the whole file; `unit` is "line" (JSON lines) or "row"."""

    def __init__(self, path: str | Path, line: int | None, field_name: str, message: str, unit: str = "line"):
        self.path, self.line, self.field, self.unit = str(path), line, field_name, unit
        where = f"{path}: {unit} {line}" if line is not None else str(path)
        super().__init__(f"{where}: field '{field_name}': {message}")


@dataclass
class Loaded:
    items: list                                     # Sample or Demonstration
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # one message per skipped row


class _RowError(Exception):
    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message


class _LongInt:
    """A JSON integer literal with more digits than Python converts (sys.get_int_max_str_digits):
    kept as text so the row, not the whole file, is reported."""

    def __init__(self, text: str):
        self.text = text

    @property
    def digits(self) -> int:
        return len(self.text.lstrip("-"))


def _parse_int(text: str):
    try:
        return int(text)
    except ValueError:
        return _LongInt(text)


def _kind(value: Any) -> str:
    if isinstance(value, _LongInt):
        return f"a {value.digits}-digit integer"
    return type(value).__name__


def _short(value: Any, n: int = 60) -> str:
    s = repr(value) if not isinstance(value, _LongInt) else value.text
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} characters)"


# --------------------------------------------------------------------------------------------
# Reading rows: (1-based line or row, row) pairs


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((n, _RowError("<utf-8>", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                                     f"column {e.start + 1}); save the file as UTF-8")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line, parse_int=_parse_int)))
            except json.JSONDecodeError as e:
                rows.append((n, _RowError("<json>", f"not valid JSON ({e.msg} at column {e.colno})")))
            except RecursionError:
                rows.append((n, _RowError("<json>", "not valid JSON (nested too deeply)")))
    return rows


def _read_rows(path: Path) -> tuple[list[tuple[int, Any]], str]:
    """Rows as (number, Python value), and the unit the numbers count ("line" or "row")."""
    if not path.exists():
        raise DataError(path, None, "<file>", "file not found")
    if path.is_dir():
        raise DataError(path, None, "<file>", "is a folder, not a data file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(path, None, "<file>", f"cannot be read as parquet: {type(e).__name__}: {e}") from None
        return list(enumerate(table.to_pylist(), 1)), "row"
    if suffix not in (".json", ".jsonl"):
        raise DataError(path, None, "<file>", "unknown format (use .jsonl, .json or .parquet)")
    if suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):  # one JSON array of rows
            try:
                data = json.loads(path.read_bytes().decode("utf-8-sig"), parse_int=_parse_int)
            except UnicodeDecodeError as e:
                raise DataError(path, None, "<utf-8>", f"not valid UTF-8 (byte offset {e.start})") from None
            except (json.JSONDecodeError, RecursionError) as e:
                why = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) \
                    else "nested too deeply"
                raise DataError(path, None, "<json>", f"not valid JSON ({why})") from None
            return list(enumerate(data, 1)), "row"
    return _json_lines(path), "line"


def _data_uri_bytes(value: str, name: str) -> bytes:
    head, sep, payload = value.partition(",")
    if not sep or ";base64" not in head:
        raise _RowError(name, "a data: URI must look like 'data:image/png;base64,<base64 data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _RowError(name, "a data: URI whose payload is not valid base64") from None


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def _load_image(value: Any, base: Path, name: str) -> Image.Image:
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source: Any = io.BytesIO(value)
    elif isinstance(value, str) and value.startswith("data:"):
        source = io.BytesIO(_data_uri_bytes(value, name))
    elif isinstance(value, str) and value:
        p = Path(value)
        source = p if p.is_absolute() else base / p
        try:
            found = source.exists()
        except OSError as e:  # e.g. a base64 string: "File name too long"
            found, why = False, e.strerror or type(e).__name__
        else:
            why = "not found"
        if not found:
            if len(value) > 256 and _BASE64.fullmatch(value):
                raise _RowError(name, f"a {len(value)}-character string that looks like base64 image data, not "
                                      "a file path; write it as a data URI ('data:image/png;base64,' + data)")
            raise _RowError(name, f"image file {why}: {_short(str(source), 200)}")
    else:
        raise _RowError(name, f"must be a path, a data: URI, bytes or {{'bytes', 'path'}}, got {_kind(value)}")
    try:
        with Image.open(source) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise _RowError(name, f"unreadable image ({type(e).__name__})") from e


def _images(row: dict, base: Path) -> list[Image.Image]:
    value = row.get("images")
    if value is None:
        return []
    if not isinstance(value, list):
        raise _RowError("images", f"must be a list, got {_kind(value)}")
    return [_load_image(v, base, f"images[{i}]") for i, v in enumerate(value)]


def _tools(row: dict, default_tools: list[str] | None, known_tools: set[str] | None) -> list[str] | None:
    """Missing = the default set (None when there is none); [] = none; every name must be a
    known tool."""
    value = row.get("tools")
    if value is None:
        return None if default_tools is None else list(default_tools)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RowError("tools", f"must be a list of tool names, got {_short(value)}")
    if known_tools is not None:
        for j, name in enumerate(value):
            if name not in known_tools:
                raise _RowError(f"tools[{j}]",
                                f"unknown tool {name!r}; known tools: {', '.join(sorted(known_tools))}")
    return value


def _load(path: str | Path, on_bad_row: str, parse_row) -> Loaded:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    out = Loaded(items=[])
    rows, unit = _read_rows(path)
    for index, (n, row) in enumerate(rows):
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError("<row>", f"must be a JSON object, got {_kind(row)}")
            out.items.append(parse_row(row, index, n, path, unit))
        except _RowError as e:
            err = DataError(path, n, e.field, e.message, unit)
            if on_bad_row == "error":
                raise err from None
            out.skipped += 1
            out.errors.append(str(err))
    if not out.items:
        why = f"all {out.skipped} rows are bad; first: {out.errors[0]}" if out.skipped else "no rows"
        raise DataError(path, None, "<file>", why)
    return out


# --------------------------------------------------------------------------------------------
# Questions


def _str_list(row: dict, name: str) -> list[str] | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RowError(name, "must be a list of strings")
    return value


def _answer(row: dict) -> str:
    answer = row.get("answer")
    if answer is None:
        raise _RowError("answer", "missing")
    if isinstance(answer, _LongInt):
        raise _RowError("answer", f"a {answer.digits}-digit number is longer than Python reads "
                                  f"({sys.get_int_max_str_digits()} digits); give it as a string "
                                  "with answer_type 'exact'")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _RowError("answer", f"must be a string or a number, got {_kind(answer)}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise _RowError("answer", f"must be a finite number, got {answer}")
    text = str(answer)
    if not text.strip():
        raise _RowError("answer", "must not be empty")
    return text


def load_samples(path: str | Path, on_bad_row: str = "error", default_tools: list[str] | None = None,
                 task: str = "user", known_tools: Iterable[str] | None = None) -> Loaded:
    """Questions for RL/evaluation -> Loaded(items=list[Sample], skipped, errors).
    `default_tools`: the tools of a row without `tools`; `known_tools`: the names a row may use
    (None: not checked)."""
    known = set(known_tools) if known_tools is not None else None
    seen: dict[str, tuple[int, bool]] = {}   # id -> (line, whether the id was given)

    def parse(row: dict, i: int, n: int, p: Path, unit: str) -> Sample:
        question = row.get("question")
        if question is None:
            raise _RowError("question", "missing")
        if not isinstance(question, str) or not question.strip():
            raise _RowError("question", f"must be a non-empty string, got {_short(question)}")
        answer = _answer(row)
        choices = _str_list(row, "choices")
        given = row.get("answer")
        answer_type = row.get("answer_type") or ("choice" if choices else
                                                 "numeric" if isinstance(given, (int, float)) else "exact")
        if answer_type not in ANSWER_TYPES:
            raise _RowError("answer_type", f"must be one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
        if answer_type == "choice" and not choices:
            raise _RowError("choices", "needed when answer_type is 'choice'")
        if choices is not None and len(choices) > len(LETTERS):
            raise _RowError("choices", f"at most {len(LETTERS)} choices (lettered A-Z), got {len(choices)}")
        if answer_type == "numeric":
            value = parse_number(answer)
            if value is None or not math.isfinite(value):
                raise _RowError("answer", f"answer_type 'numeric' needs a finite number, got {_short(answer)}")
        tools = _tools(row, default_tools, known) or []
        if row.get("task") is not None and not isinstance(row["task"], str):
            raise _RowError("task", f"must be a string, got {_kind(row['task'])}")
        uid = row.get("id")
        if uid is not None and (isinstance(uid, bool) or not isinstance(uid, (str, int))):
            raise _RowError("id", f"must be a string or an integer, got {_kind(uid)}")
        uid = str(uid) if uid is not None else f"{p.stem}-{i}"
        if uid in seen:
            first, given = seen[uid]
            how = "" if given else " (its default id, made from the file name and row)"
            raise _RowError("id", f"duplicate id {uid!r}: {unit} {first} of this file has the same id{how}; "
                                  "ids must be unique (rewards look questions up by id)")
        sample = Sample(
            uid=uid, task=str(row.get("task") or task),
            question=question, images=_images(row, p.parent), answer=answer, answer_type=answer_type,
            choices=choices, tools=tools,
            meta={"source": str(p), "row": i, **({"line": n} if unit == "line" else {})},
        )
        if answer_type == "choice" and answer_index(sample) is None:
            letters = f"A-{LETTERS[len(choices) - 1]}" if len(choices) > 1 else "A"
            raise _RowError("answer",
                            f"{_short(answer)} is neither one of the choices {choices} nor a letter {letters}")
        seen[uid] = (n, row.get("id") is not None)
        return sample

    return _load(path, on_bad_row, parse)


# --------------------------------------------------------------------------------------------
# SFT transcripts


def _drop_nulls(value: Any) -> Any:
    """Undo Arrow's struct unification, which gives every dict in a column every key seen in
    the file (None where a row lacked it): e.g. zoom arguments gaining a null 'code'."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _check_tool_calls(m: dict, where: str, tools: list[str] | None, known: set[str] | None) -> None:
    """Validate (and normalise: JSON-string arguments become objects) an assistant's tool calls:
    each names one of the row's `tools` (None: not known, then any of `known`, if given)."""
    calls = m.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise _RowError(f"{where}.tool_calls", f"must be a list, got {_kind(calls)}")
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise _RowError(at, f"must be an object, got {_kind(call)}")
        fn = call.get("function", call)
        if fn is not call:
            at += ".function"
        if not isinstance(fn, dict):
            raise _RowError(at, f"must be an object with 'name' and 'arguments', got {_kind(fn)}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _RowError(f"{at}.name", f"must be a tool name (a string), got {_short(name)}")
        if tools is not None and name not in tools:
            raise _RowError(f"{at}.name",
                            f"{name!r} is not one of this row's tools ({', '.join(tools) or 'none'})")
        if tools is None and known is not None and name not in known:
            raise _RowError(f"{at}.name", f"unknown tool {name!r}; known tools: {', '.join(sorted(known))}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError):
                raise _RowError(f"{at}.arguments", f"a string that is not valid JSON: {_short(fn['arguments'])}") \
                    from None
            fn["arguments"] = args
        if not isinstance(args, dict):
            raise _RowError(f"{at}.arguments", f"must be an object (or a JSON string of one), got {_kind(args)}")


def load_demonstrations(path: str | Path, on_bad_row: str = "error", default_tools: list[str] | None = None,
                        known_tools: Iterable[str] | None = None) -> Loaded:
    """SFT transcripts -> Loaded(items=list[Demonstration], skipped, errors). `default_tools`,
    `known_tools`: as for load_samples; the row's tools are rendered into its prompt."""
    known = set(known_tools) if known_tools is not None else None

    def parse(row: dict, i: int, n: int, p: Path, unit: str) -> Demonstration:
        messages = row.get("messages")
        if messages is None:
            raise _RowError("messages", "missing")
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except (json.JSONDecodeError, RecursionError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise _RowError("messages", f"a string that is not valid JSON ({why})") from None
        if not isinstance(messages, list) or not messages:
            raise _RowError("messages", "must be a non-empty list of messages")
        messages = _drop_nulls(messages)
        tools = _tools(row, default_tools, known)
        n_images = 0
        for j, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _RowError(f"messages[{j}]", "must be an object")
            if m.get("role") not in ROLES:
                raise _RowError(f"messages[{j}].role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
            content = m.setdefault("content", "")
            if isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or "type" not in part:
                        raise _RowError(f"messages[{j}].content", "parts must be objects with a 'type'")
                    n_images += part["type"] == "image"
            elif not isinstance(content, str):
                raise _RowError(f"messages[{j}].content", "must be a string or a list of parts")
            if m.get("tool_calls") is not None and m["role"] != "assistant":
                raise _RowError(f"messages[{j}].tool_calls",
                                f"only assistant turns make tool calls, not {m['role']!r}")
            _check_tool_calls(m, f"messages[{j}]", tools, known)
        roles = {m["role"] for m in messages}
        if "user" not in roles:
            raise _RowError("messages", "no user turn (the question must be a 'user' message)")
        if "assistant" not in roles:
            raise _RowError("messages", "no assistant turn (nothing to train on)")
        images = _images(row, p.parent)
        if n_images != len(images):
            raise _RowError("images", f"{len(images)} images for {n_images} image entries in the messages")
        used_tool = any(m.get("tool_calls") for m in messages if m["role"] == "assistant")
        uid = row.get("id")
        return Demonstration(messages=messages, images=images, used_tool=used_tool, tool_call_correct=None,
                             tools=tools or [], uid=str(uid) if uid is not None and not isinstance(uid, _LongInt)
                             else f"{p.stem}-{i}")

    return _load(path, on_bad_row, parse)
