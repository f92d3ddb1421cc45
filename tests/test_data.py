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
    assert e.value.path == str(path) and e.value.line == 3 and e.value.field == field
    assert str(path) in str(e.value) and "line 3" in str(e.value) and words in str(e.value)


def test_bad_rows_are_skipped_and_counted(folder):
    (folder / "imgs" / "broken.png").write_bytes(b"garbage")
    rows = GOOD + [b for b, _, _ in BAD]
    loaded = load_samples(_jsonl(folder / "q.jsonl", rows), on_bad_row="skip")
    assert len(loaded.items) == len(GOOD) and loaded.skipped == len(BAD) == len(loaded.errors)
    assert all("q.jsonl: line" in m for m in loaded.errors)
    with pytest.raises(ValueError, match="on_bad_row"):
        load_samples(folder / "q.jsonl", on_bad_row="ignore")


def test_wrong_types_and_bad_json_lines(folder):
    path = folder / "q.jsonl"
    path.write_text(json.dumps(GOOD[1]) + "\n" + json.dumps({"question": 5, "answer": "x"}) + "\n")
    with pytest.raises(DataError, match="line 2: field 'question'"):
        load_samples(path)
    path.write_text(json.dumps(GOOD[1]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2: field '<json>'"):
        load_samples(path)
    loaded = load_samples(path, on_bad_row="skip")
    assert len(loaded.items) == 1 and loaded.skipped == 1
    with pytest.raises(DataError, match="file not found"):
        load_samples(folder / "missing.jsonl")


def test_unreadable_image_bytes_in_parquet(folder):
    table = pa.table({"images": [[_png_bytes()], [b"not an image"]], "question": ["a", "b"], "answer": ["1", "2"]})
    pq.write_table(table, folder / "q.parquet")
    with pytest.raises(DataError, match=r"row 2: field 'images\[0\]': unreadable image"):
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
    with pytest.raises(DataError, match="line 1: field 'images'"):
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


# --------------------------------------------------------------------------------------------
# Issue #18: every bad input is a DataError naming file, 1-based line and field


TOOLS = ["image_zoom_in", "python", "search"]


def _write_lines(path, lines):
    """Rows as given: dicts are dumped, str/bytes written verbatim (one per line)."""
    out = b""
    for r in lines:
        out += (json.dumps(r).encode() if isinstance(r, dict) else r.encode() if isinstance(r, str) else r) + b"\n"
    path.write_bytes(out)
    return path


def _b64_png():
    import base64

    return base64.b64encode(_png_bytes()).decode()


BAD_INPUTS = [
    # (bad line, field, words in the message)
    (b'{"question": "q", "answer": "caf\xff"}', "<utf-8>", "not valid UTF-8 (byte 0xff"),
    ('{"question": "q", "answer": ' + "7" * 5000 + "}", "answer", "5000-digit number"),
    ({"question": "q", "answer": "x", "images": ["A" * 100_000]}, "images[0]", "looks like base64 image data"),
    ({"question": "q", "answer": "abc", "answer_type": "numeric"}, "answer", "needs a finite number, got 'abc'"),
    ({"question": "q", "answer": "green", "choices": ["red", "blue"]}, "answer",
     "'green' is neither one of the choices ['red', 'blue'] nor a letter A-B"),
    ({"question": "q", "answer": "E", "choices": ["red", "blue"]}, "answer", "nor a letter A-B"),
    ({"question": "q", "answer": "x", "tools": ["python", "calculator"]}, "tools[1]", "unknown tool 'calculator'"),
    ({"question": "q", "answer": "x", "id": "g1"}, "id", "duplicate id 'g1': line 1 of this file"),
    ({"question": "q", "answer": "x", "answer_type": "numeric", "answer": float("inf")}, "answer", "finite"),
]


@pytest.mark.parametrize("bad, field, words", BAD_INPUTS)
def test_bad_input_names_file_line_and_field(folder, bad, field, words):
    """Blank lines count: the bad row is on line 4 of the file, as an editor shows it."""
    path = _write_lines(folder / "q.jsonl", [{"question": "q", "answer": "1", "id": "g1"}, "", "   ", bad,
                                             GOOD[1]])
    with pytest.raises(DataError) as e:
        load_samples(path, known_tools=TOOLS)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 4, field), str(e.value)
    assert str(e.value).startswith(f"{path}: line 4: field '{field}': ") and words in str(e.value), str(e.value)
    assert len(str(e.value)) < 600   # never the 100k-character value itself
    loaded = load_samples(path, on_bad_row="skip", known_tools=TOOLS)
    assert len(loaded.items) == 2 and loaded.skipped == 1 and "line 4" in loaded.errors[0]


def test_tools_missing_empty_and_default(folder):
    path = _jsonl(folder / "q.jsonl", [{"question": "q", "answer": "1"},
                                       {"question": "q", "answer": "2", "tools": []},
                                       {"question": "q", "answer": "3", "tools": ["python"]}])
    a, b, c = load_samples(path, default_tools=TOOLS, known_tools=TOOLS).items
    assert a.tools == TOOLS and b.tools == [] and c.tools == ["python"]


def test_image_as_data_uri(folder):
    path = _jsonl(folder / "q.jsonl", [{"question": "q", "answer": "1",
                                        "images": ["data:image/png;base64," + _b64_png()]}])
    assert load_samples(path).items[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    _jsonl(path, [{"question": "q", "answer": "1", "images": ["data:image/png;base64,@@@"]}])
    with pytest.raises(DataError, match=r"line 1: field 'images\[0\]': a data: URI whose payload is not valid base64"):
        load_samples(path)


def test_good_numeric_and_choice_answers_load(folder):
    path = _jsonl(folder / "q.jsonl", [{"question": "q", "answer": "1,250", "answer_type": "numeric"},
                                       {"question": "q", "answer": 3.5},
                                       {"question": "q", "answer": "b", "choices": ["red", "blue"]},
                                       {"question": "q", "answer": "blue", "choices": ["red", "blue"]},
                                       {"question": "q", "answer": "7" * 5000}])   # a string: exact
    loaded = load_samples(path)
    assert [s.answer_type for s in loaded.items] == ["numeric", "numeric", "choice", "choice", "exact"]


def test_duplicate_id_names_both_lines_even_when_one_is_a_default_id(folder):
    path = _jsonl(folder / "q.jsonl", [{"question": "q", "answer": "1"}, {"question": "q", "answer": "2", "id": "q-0"}])
    with pytest.raises(DataError, match=r"line 2: field 'id': duplicate id 'q-0': line 1 of this file .*default id"):
        load_samples(path)


def test_empty_file_is_an_error(folder):
    (folder / "q.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_samples(folder / "q.jsonl")
    _jsonl(folder / "q.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match="all 1 rows are bad; first: .*line 1: field 'answer': missing"):
        load_samples(folder / "q.jsonl", on_bad_row="skip")


def _demo(**call):
    fn = {"name": "python", "arguments": {"code": "print(1)"}, **call}
    return {"messages": [{"role": "user", "content": "1?"},
                         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": fn}]},
                         {"role": "tool", "content": "1"},
                         {"role": "assistant", "content": "\\boxed{1}"}]}


SFT_BAD = [
    (_demo(name=7), "messages[1].tool_calls[0].function.name", "must be a tool name (a string), got 7"),
    (_demo(arguments="{code: print(1)"), "messages[1].tool_calls[0].function.arguments",
     "a string that is not valid JSON"),
    (_demo(arguments="[1, 2]"), "messages[1].tool_calls[0].function.arguments", "must be an object"),
    (_demo(name="calculator"), "messages[1].tool_calls[0].function.name", "'calculator' is not one of this row's tools"),
    ({**_demo(), "tools": ["search"]}, "messages[1].tool_calls[0].function.name",
     "'python' is not one of this row's tools (search)"),
    ({**_demo(), "tools": ["calculator"]}, "tools[0]", "unknown tool 'calculator'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "\\boxed{1}"}]},
     "messages", "no user turn"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn"),
]


@pytest.mark.parametrize("bad, field, words", SFT_BAD)
def test_sft_bad_input_names_file_line_and_field(folder, bad, field, words):
    path = _write_lines(folder / "sft.jsonl", [_demo(), "", bad])
    with pytest.raises(DataError) as e:
        load_demonstrations(path, default_tools=TOOLS, known_tools=TOOLS)
    assert (e.value.line, e.value.field) == (3, field) and words in str(e.value), str(e.value)


def test_sft_tools_and_string_arguments(folder):
    path = _jsonl(folder / "sft.jsonl", [_demo(arguments='{"code": "print(1)"}'), {**_demo(), "tools": ["python"]},
                                         {"messages": _demo()["messages"][:1] + [{"role": "assistant", "content": "x"}],
                                          "tools": []}])
    a, b, c = load_demonstrations(path, default_tools=TOOLS, known_tools=TOOLS).items
    # JSON-string arguments become the object the chat template renders (as the policy writes them).
    assert a.messages[1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(1)"}
    assert a.tools == TOOLS and b.tools == ["python"] and c.tools == []


def test_sources_score_train_and_eval_questions_with_the_same_id_apart(folder):
    """H3: a training and an evaluation row with the same id (or files with the same name and
    default ids) are each scored against their own answer."""
    from axpo.agent.trajectory import Trajectory
    from axpo.config import load_config
    from axpo.sources import build_sources

    (folder / "train").mkdir()
    (folder / "eval").mkdir()
    train = _jsonl(folder / "train" / "q.jsonl", [{"id": "x", "question": "q", "answer": "red"},
                                                  {"question": "q", "answer": "7", "tools": ["calculator"]}])
    evals = _jsonl(folder / "eval" / "q.jsonl", [{"id": "x", "question": "q", "answer": "blue"},
                                                 {"question": "q", "answer": "8"}])
    cfg = load_config(None, [f"data.train_file={train}", f"data.eval_file={evals}", "data.tasks=[perception]"])
    with pytest.raises(DataError, match=r"train/q.jsonl: line 2: field 'tools\[0\]': unknown tool 'calculator'"):
        build_sources(cfg)
    _jsonl(train, [{"id": "x", "question": "q", "answer": "red"}, {"question": "q", "answer": "7", "tools": []}])
    src = build_sources(cfg)
    assert src.train[1].tools == [] and src.eval[1].tools == sorted(src.tools.tools) == sorted(TOOLS)

    def traj(uid, text):
        return Trajectory(uid="t", sample_uid=uid, group=0, prompt_len=0, finished=True, final_text=text)

    assert src.reward(traj("x", "\\boxed{red}"), "train") == 1.0
    assert src.reward(traj("x", "\\boxed{blue}"), "eval") == 1.0
    assert src.reward_fn("train")(traj("q-1", "\\boxed{7}")) == 1.0
    assert src.reward_fn("eval")(traj("q-1", "\\boxed{8}")) == 1.0
    assert src.reward(traj("x", "\\boxed{blue}"), "train") == 0.0
    with pytest.raises(KeyError, match="not in the eval split"):
        src.reward(traj("nope", "\\boxed{1}"), "eval")
