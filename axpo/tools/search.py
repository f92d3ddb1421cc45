"""`search`: text snippets from a pluggable provider; by default an offline BM25 index.

The paper's agent searches the web; this project trains offline, so the default provider ranks a
local document collection (for the built-in search task: the fact collection it generates, see
`axpo.tasks.search_facts.build_corpus`). A web provider only has to implement `SearchProvider`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from axpo.tools.base import ToolContext, ToolResult, error_result, function_schema


@dataclass
class Snippet:
    title: str
    text: str


@runtime_checkable
class SearchProvider(Protocol):
    def search(self, query: str, k: int) -> list[Snippet]: ...


_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25Index:
    """Okapi BM25 (Robertson & Zaragoza 2009) with the usual k1=1.5, b=0.75 and the non-negative
    idf variant log(1 + (N - df + 0.5) / (df + 0.5)). Title words count like body words."""

    def __init__(self, docs: list[Snippet], k1: float = 1.5, b: float = 0.75):
        self.docs, self.k1, self.b = docs, k1, b
        self.tfs = [Counter(tokenize(f"{d.title} {d.text}")) for d in docs]
        self.lengths = [sum(tf.values()) for tf in self.tfs]
        self.avg_len = sum(self.lengths) / max(1, len(docs))
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        # Inverted index: only documents sharing a term with the query are scored.
        self.postings: dict[str, list[int]] = {}
        for i, tf in enumerate(self.tfs):
            for t in tf:
                self.postings.setdefault(t, []).append(i)

    def scores(self, query: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for term in set(tokenize(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for i in self.postings[term]:
                tf = self.tfs[i][term]
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg_len)
                out[i] = out.get(i, 0.0) + idf * tf * (self.k1 + 1) / norm
        return out

    def search(self, query: str, k: int) -> list[Snippet]:
        ranked = sorted(self.scores(query).items(), key=lambda kv: (-kv[1], kv[0]))
        return [self.docs[i] for i, _ in ranked[:k]]


def load_documents(path: str | Path) -> list[Snippet]:
    """A JSONL file of {"title": ..., "text": ...} rows."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("title"), str) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}: line {n + 1}: needs string fields 'title' and 'text'")
                docs.append(Snippet(row["title"], row["text"]))
    return docs


@dataclass
class SearchConfig:
    default_results: int = 5
    max_results: int = 10            # requests are clamped to 1..max_results
    max_snippet_chars: int = 300     # per snippet
    corpus_path: str = ""            # JSONL of {"title","text"}; empty = built-in search-task corpus


class SearchTool:
    name = "search"

    def __init__(self, provider: SearchProvider, cfg: SearchConfig | None = None):
        self.provider = provider
        self.cfg = cfg or SearchConfig()

    def schema(self) -> dict:
        return function_schema(
            self.name,
            "Search a document collection; returns the best-matching text snippets.",
            {
                "query": {"type": "string", "description": "Keywords to search for."},
                "max_results": {"type": "integer", "default": self.cfg.default_results,
                                "description": f"Number of snippets (1-{self.cfg.max_results})."},
            },
            ["query"],
        )

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        query = arguments["query"].strip()
        if not query:
            return error_result("bad_arguments", "'query' is empty; give some keywords.")
        k = max(1, min(self.cfg.max_results, arguments.get("max_results", self.cfg.default_results)))
        hits = self.provider.search(query[:500], k)
        if not hits:
            return ToolResult(text=f'No results for "{query[:100]}".')
        lines = []
        for i, hit in enumerate(hits, 1):
            text = hit.text if len(hit.text) <= self.cfg.max_snippet_chars else \
                hit.text[: self.cfg.max_snippet_chars].rsplit(" ", 1)[0] + " ..."
            lines.append(f"[{i}] {hit.title}: {text}")
        return ToolResult(text="\n".join(lines))
