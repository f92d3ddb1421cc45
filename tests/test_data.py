import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from axpo.data import DataError, load_demonstrations, load_samples


def _png_bytes(colour=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "imgs" / "blue.png")
    return tmp_path


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [
    {"images": ["imgs/blue.png"], "question": "What colour?", "answer": "blue", "tools": ["image_zoom_in"]},
    {"question": "2+2?", "answer": "4", "answer_type": "numeric", "tools": ["python"]},
    {"images": ["imgs/blue.png"], "question": "Pick", "answer": "B", "choices": ["red", "blue"]},
]


def test_good_jsonl_loads_with_relative_paths(folder):
    loaded = load_samples(_jsonl(folder / "q.jsonl", GOOD), default_tools=["search"])
    assert loaded.skipped == 0 and len(loaded.items) == 3
    a, b, c = loaded.items
    assert a.images[0].getpixel((0, 0)) == (0, 0, 255) and a.tools == ["image_zoom_in"]
    assert b.images == [] and b.answer_type == "numeric"
    assert c.answer_type == "choice" and c.choices == ["red", "blue"] and c.tools == ["search"]
    assert a.uid == "q-0" and a.meta["row"] == 0


def test_good_parquet_with_image_bytes(folder):
    table = pa.table({
        "images": [[_png_bytes()], [_png_bytes((0, 255, 0)), _png_bytes()]],
        "question": ["Colour?", "Which is first?"],
        "answer": ["red", "green"],
        "tools": [["image_zoom_in"], []],
    })
    pq.write_table(table, folder / "q.parquet")
    loaded = load_samples(folder / "q.parquet")
    assert [len(s.images) for s in loaded.items] == [1, 2]
    assert loaded.items[1].images[0].getpixel((1, 1)) == (0, 255, 0)


BAD = [
    ({"images": ["imgs/blue.png"], "answer": "x"}, "question", "missing"),
    ({"question": "q"}, "answer", "missing"),
    ({"images": ["imgs/nope.png"], "question": "q", "answer": "x"}, "images[0]", "not found"),
    ({"images": ["imgs/blue.png", "imgs/broken.png"], "question": "q", "answer": "x"}, "images[1]", "unreadable"),
    ({"question": "q", "answer": "x", "answer_type": "fuzzy"}, "answer_type", "one of"),
    ({"question": "q", "answer": "x", "answer_type": "choice"}, "choices", "needed"),
]


@pytest.mark.parametrize("bad, field, words", BAD)
def test_bad_row_error_names_file_row_and_field(folder, bad, field, words):
    (folder / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = _jsonl(folder / "q.jsonl", GOOD[:2] + [bad] + GOOD[2:])
    with pytest.raises(DataError) as e:
        load_samples(path)
    assert e.value.path == str(path) and e.value.row == 2 and e.value.field == field
    assert str(path) in str(e.value) and "row 2" in str(e.value) and words in str(e.value)


def test_bad_rows_are_skipped_and_counted(folder):
    (folder / "imgs" / "broken.png").write_bytes(b"garbage")
    rows = GOOD + [b for b, _, _ in BAD]
    loaded = load_samples(_jsonl(folder / "q.jsonl", rows), on_bad_row="skip")
    assert len(loaded.items) == len(GOOD) and loaded.skipped == len(BAD) == len(loaded.errors)
    assert all("q.jsonl: row" in m for m in loaded.errors)
    with pytest.raises(ValueError, match="on_bad_row"):
        load_samples(folder / "q.jsonl", on_bad_row="ignore")


def test_wrong_types_and_bad_json_lines(folder):
    path = folder / "q.jsonl"
    path.write_text(json.dumps(GOOD[1]) + "\n" + json.dumps({"question": 5, "answer": "x"}) + "\n")
    with pytest.raises(DataError, match="row 1: field 'question'"):
        load_samples(path)
    path.write_text(json.dumps(GOOD[1]) + "\n{oops\n")
    with pytest.raises(DataError, match="row 1: field '<json>'"):
        load_samples(path)
    loaded = load_samples(path, on_bad_row="skip")
    assert len(loaded.items) == 1 and loaded.skipped == 1
    with pytest.raises(DataError, match="file not found"):
        load_samples(folder / "missing.jsonl")


def test_unreadable_image_bytes_in_parquet(folder):
    table = pa.table({"images": [[_png_bytes()], [b"not an image"]], "question": ["a", "b"], "answer": ["1", "2"]})
    pq.write_table(table, folder / "q.parquet")
    with pytest.raises(DataError, match=r"row 1: field 'images\[0\]': unreadable image"):
        load_samples(folder / "q.parquet")
    assert load_samples(folder / "q.parquet", on_bad_row="skip").skipped == 1


def _demo_rows():
    zoom = {"role": "assistant", "reasoning_content": "zoom", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "image_zoom_in",
                                                             "arguments": {"bbox_2d": [0, 0, 10, 10]}}}]}
    py = {"role": "assistant", "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(1)"}}}]}
    return [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}, zoom,
                      {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "crop"}]},
                      {"role": "assistant", "content": "\\boxed{red}"}],
         "images": ["imgs/blue.png", "imgs/blue.png"]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "1?"}]}, py,
                      {"role": "tool", "content": [{"type": "text", "text": "1"}]},
                      {"role": "assistant", "content": "\\boxed{1}"}], "images": []},
    ]


def test_sft_rows_load_without_arrow_null_padding(folder):
    loaded = load_demonstrations(_jsonl(folder / "sft.jsonl", _demo_rows()))
    a, b = loaded.items
    assert len(a.images) == 2 and a.used_tool and b.used_tool
    # Arrow unifies structs across rows; the loaded arguments must be exactly what was written.
    assert a.messages[1]["tool_calls"][0]["function"]["arguments"] == {"bbox_2d": [0, 0, 10, 10]}
    assert b.messages[1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(1)"}
    assert a.messages[0]["content"][0] == {"type": "image"}


def test_sft_bad_rows(folder):
    rows = _demo_rows()
    rows[0]["images"] = ["imgs/blue.png"]  # 1 image for 2 image entries
    rows.append({"messages": [{"role": "robot", "content": "hi"}], "images": []})
    rows.append({"images": []})
    with pytest.raises(DataError, match="row 0: field 'images'"):
        load_demonstrations(_jsonl(folder / "sft.jsonl", rows))
    loaded = load_demonstrations(folder / "sft.jsonl", on_bad_row="skip")
    assert len(loaded.items) == 1 and loaded.skipped == 3
    assert any("messages[0].role" in m for m in loaded.errors)


def test_sft_messages_as_json_string_in_parquet(folder):
    rows = _demo_rows()
    table = pa.table({"messages": [json.dumps(r["messages"]) for r in rows],
                      "images": [[_png_bytes(), _png_bytes()], []]})
    pq.write_table(table, folder / "sft.parquet")
    loaded = load_demonstrations(folder / "sft.parquet")
    assert [len(d.images) for d in loaded.items] == [2, 0]
