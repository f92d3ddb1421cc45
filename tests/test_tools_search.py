import json

from axpo.tools import BM25Index, SearchConfig, SearchTool, Snippet, ToolContext, ToolRegistry, build_tools
from axpo.tools.search import load_documents

DOCS = [
    Snippet("Zorbia", "The capital of Zorbia is Qelvan."),
    Snippet("Zorbia", "Zorbia was founded in 1204."),
    Snippet("Marnia", "The capital of Marnia is Tosk."),
    Snippet("Cooking", "Bread needs flour, water and yeast."),
]


def test_bm25_ranks_the_matching_document_first():
    index = BM25Index(DOCS)
    hits = index.search("capital of Zorbia", 2)
    assert hits[0].text == "The capital of Zorbia is Qelvan."
    assert index.search("yeast", 5) == [DOCS[3]]
    assert index.search("nothing matches this", 5) == []


def test_max_results_is_clamped_and_default_applies():
    docs = [Snippet(f"d{i}", f"common word {i}") for i in range(30)]
    reg = ToolRegistry([SearchTool(BM25Index(docs), SearchConfig(default_results=5, max_results=10))])
    for k, expected in [(None, 5), (0, 1), (-3, 1), (3, 3), (50, 10)]:
        args = {"query": "common word"} if k is None else {"query": "common word", "max_results": k}
        _, r = reg.execute(json.dumps({"name": "search", "arguments": args}), ToolContext())
        assert r.error is None and len(r.text.splitlines()) == expected


def test_pluggable_provider():
    class Fixed:
        def search(self, query, k):
            return [Snippet("echo", query)] * k

    reg = build_tools(["search"], search_provider=Fixed())
    _, r = reg.execute('{"name": "search", "arguments": {"query": "hello", "max_results": 2}}', ToolContext())
    assert r.text == "[1] echo: hello\n[2] echo: hello"


def test_default_provider_indexes_the_search_task_corpus():
    from axpo.tasks import generate_task

    sample = generate_task("search", 1, seed=3)[0]
    reg = build_tools(["search"])
    _, r = reg.execute(json.dumps(sample.oracle_call), ToolContext())
    assert sample.answer in r.text


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"title": d.title, "text": d.text}) for d in DOCS) + "\n")
    assert load_documents(path) == DOCS
    reg = build_tools(["search"], documents=load_documents(path))
    _, r = reg.execute('{"name": "search", "arguments": {"query": "Marnia capital", "max_results": 1}}', ToolContext())
    assert "Tosk" in r.text


def test_malformed_search_calls():
    reg = build_tools(["search"], documents=DOCS)
    cases = [
        ('{"name": "search", "arguments": {}}', "bad_arguments", "query"),
        ('{"name": "search", "arguments": {"query": 5}}', "bad_arguments", "query"),
        ('{"name": "search", "arguments": {"query": "   "}}', "bad_arguments", "query"),
        ('{"name": "search", "arguments": {"query": "x", "max_results": "5"}}', "bad_arguments", "max_results"),
        ('{"name": "search", "arguments": {"query": "x", "max_results": 2.5}}', "bad_arguments", "max_results"),
    ]
    for text, kind, mentions in cases:
        call, r = reg.execute(text, ToolContext())
        assert r.error == kind and mentions in r.text, (text, r)
    assert reg.error_counts["bad_arguments"] == len(cases)


def test_huge_max_results_is_an_error_naming_it():
    """A 5000-digit integer made json's int conversion raise ValueError out of execute()."""
    reg = ToolRegistry([SearchTool(BM25Index(DOCS))])
    for literal in ("9" * 5000, str(2**64), "1e999"):
        call, r = reg.execute('{"name": "search", "arguments": {"query": "capital", "max_results": %s}}' % literal,
                              ToolContext())
        assert call.name == "search" and r.error == "bad_arguments" and "'max_results'" in r.text
