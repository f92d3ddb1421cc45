"""User datasets: question files for RL/evaluation and chat transcripts for SFT.

Question rows (JSONL or parquet):
    {"images": [path | bytes | {"bytes": ..., "path": ...}, ...], "question": str, "answer": str,
     "tools": [tool names], "answer_type": "exact" | "numeric" | "choice", "choices": [str, ...], "id": str}
    (`images`, `tools`, `answer_type`, `choices`, `id` optional; a numeric answer may be a number)
SFT rows:
    {"messages": [Hugging Face chat messages] (or that list as a JSON string), "images": [...]}

Files are read with Hugging Face `datasets` (local files only). Relative image paths resolve
against the data file's folder. A bad row raises `DataError` naming file, row (0-based) and field,
or, with on_bad_row="skip", is skipped and counted.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from axpo.tasks.base import Demonstration, Sample

ANSWER_TYPES = ("exact", "numeric", "choice")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad row in a user data file; names the file, the row and the field."""

    def __init__(self, path: str | Path, row: int | None, field_name: str, message: str):
        self.path, self.row, self.field = str(path), row, field_name
        where = f"{path}: row {row}" if row is not None else str(path)
        super().__init__(f"{where}: field '{field_name}': {message}")


@dataclass
class Loaded:
    items: list                                     # Sample or Demonstration
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # one message per skipped row


class _RowError(Exception):
    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message


# --------------------------------------------------------------------------------------------
# Reading rows


def _read_rows(path: Path) -> list[Any]:
    """Rows as Python dicts. JSON rows whose types disagree across the file (which Arrow cannot
    put in one column) are read line by line instead, so the bad row can be reported."""
    import datasets

    if not path.exists():
        raise DataError(path, None, "<file>", "file not found")
    suffix = path.suffix.lower()
    kind = "parquet" if suffix in (".parquet", ".pq") else "json" if suffix in (".json", ".jsonl") else None
    if kind is None:
        raise DataError(path, None, "<file>", "unknown format (use .jsonl, .json or .parquet)")
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        return ds.to_list()
    except Exception as e:  # datasets wraps Arrow's errors in several types
        if kind != "json" or suffix != ".jsonl":
            raise DataError(path, None, "<file>", f"cannot be read: {type(e).__name__}: {e}") from e
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()
    rows: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(_RowError("<json>", f"not valid JSON ({e.msg})"))
    return rows


def _load_image(value: Any, base: Path, name: str) -> Image.Image:
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source: Any = io.BytesIO(value)
    elif isinstance(value, str) and value:
        p = Path(value)
        source = p if p.is_absolute() else base / p
        if not source.exists():
            raise _RowError(name, f"image file not found: {source}")
    else:
        raise _RowError(name, f"must be a path, bytes or {{'bytes', 'path'}}, got {type(value).__name__}")
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
        raise _RowError("images", f"must be a list, got {type(value).__name__}")
    return [_load_image(v, base, f"images[{i}]") for i, v in enumerate(value)]


def _load(path: str | Path, on_bad_row: str, parse_row) -> Loaded:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    out = Loaded(items=[])
    for i, row in enumerate(_read_rows(path)):
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError("<row>", "must be a JSON object")
            out.items.append(parse_row(row, i, path))
        except _RowError as e:
            err = DataError(path, i, e.field, e.message)
            if on_bad_row == "error":
                raise err from None
            out.skipped += 1
            out.errors.append(str(err))
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


def load_samples(path: str | Path, on_bad_row: str = "error", default_tools: list[str] | None = None,
                 task: str = "user") -> Loaded:
    """Questions for RL/evaluation -> Loaded(items=list[Sample], skipped, errors)."""

    def parse(row: dict, i: int, p: Path) -> Sample:
        question = row.get("question")
        if question is None:
            raise _RowError("question", "missing")
        if not isinstance(question, str) or not question.strip():
            raise _RowError("question", "must be a non-empty string")
        answer = row.get("answer")
        if answer is None:
            raise _RowError("answer", "missing")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise _RowError("answer", f"must be a string or a number, got {type(answer).__name__}")
        choices = _str_list(row, "choices")
        answer_type = row.get("answer_type") or ("choice" if choices else
                                                 "numeric" if isinstance(answer, (int, float)) else "exact")
        if answer_type not in ANSWER_TYPES:
            raise _RowError("answer_type", f"must be one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
        if answer_type == "choice" and not choices:
            raise _RowError("choices", "needed when answer_type is 'choice'")
        tools = _str_list(row, "tools")
        uid = row.get("id")
        return Sample(
            uid=str(uid) if uid is not None else f"{p.stem}-{i}", task=str(row.get("task") or task),
            question=question, images=_images(row, p.parent), answer=str(answer), answer_type=answer_type,
            choices=choices, tools=tools if tools is not None else list(default_tools or []),
            meta={"source": str(p), "row": i},
        )

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


def load_demonstrations(path: str | Path, on_bad_row: str = "error") -> Loaded:
    """SFT transcripts -> Loaded(items=list[Demonstration], skipped, errors)."""

    def parse(row: dict, i: int, p: Path) -> Demonstration:
        messages = row.get("messages")
        if messages is None:
            raise _RowError("messages", "missing")
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise _RowError("messages", f"a string that is not valid JSON ({e.msg})") from None
        if not isinstance(messages, list) or not messages:
            raise _RowError("messages", "must be a non-empty list of messages")
        messages = _drop_nulls(messages)
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
        images = _images(row, p.parent)
        if n_images != len(images):
            raise _RowError("images", f"{len(images)} images for {n_images} image entries in the messages")
        used_tool = any(m.get("tool_calls") for m in messages if m["role"] == "assistant")
        return Demonstration(messages=messages, images=images, used_tool=used_tool, tool_call_correct=None,
                             uid=str(row.get("id") or f"{p.stem}-{i}"))

    return _load(path, on_bad_row, parse)
