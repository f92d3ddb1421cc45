"""Tools the agent can call: `image_zoom_in`, `python`, `search`, and the registry that runs them.

    registry = build_tools(["image_zoom_in", "python", "search"], cfg)
    call, result = registry.execute(text_between_tool_call_tags, ToolContext(images=trajectory_images))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from axpo.registry import TOOLS, make_tool, register_tool
from axpo.tools.base import (ToolCall, ToolContext, ToolRegistry, ToolResult, Tool, error_result,
                             function_schema, validate_arguments)
from axpo.tools.image_zoom import ImageZoomTool, ZoomConfig, fit_to_grid, smart_resize
from axpo.tools.lockers import OpenLockerTool
from axpo.tools.python_sandbox import PythonSandboxTool, SandboxConfig
from axpo.tools.search import BM25Index, SearchConfig, SearchProvider, SearchTool, Snippet, load_documents

TOOL_NAMES = ("image_zoom_in", "python", "search")   # the built-in tools; TOOLS.names() has plugins too

__all__ = [
    "TOOL_NAMES", "TOOLS", "register_tool", "Tool", "ToolCall", "ToolContext", "ToolRegistry", "ToolResult", "ToolSetConfig",
    "ImageZoomTool", "OpenLockerTool", "ZoomConfig", "PythonSandboxTool", "SandboxConfig", "SearchTool", "SearchConfig",
    "SearchProvider", "Snippet", "BM25Index", "build_tools", "tool_set_config", "error_result",
    "function_schema", "validate_arguments", "fit_to_grid", "smart_resize", "load_documents",
]


@dataclass
class ToolSetConfig:
    zoom: ZoomConfig = field(default_factory=ZoomConfig)
    python: SandboxConfig = field(default_factory=SandboxConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


# Flat run-config fields (axpo.config.ToolsConfig) -> (sub-config, field).
_FLAT_FIELDS = {
    "python_timeout_s": ("python", "wall_timeout_s"),
    "python_memory_mb": ("python", "memory_mb"),
    "zoom_max_pixels": ("zoom", "max_pixels"),
    "search_max_results": ("search", "default_results"),
}


def tool_set_config(cfg=None) -> ToolSetConfig:
    """Accept a ToolSetConfig, None (defaults), or a flat config object such as the run config's
    `ToolsConfig` (python_timeout_s, python_memory_mb, zoom_max_pixels, search_max_results)."""
    if cfg is None:
        return ToolSetConfig()
    if isinstance(cfg, ToolSetConfig):
        return cfg
    out = ToolSetConfig()
    for flat, (group, name) in _FLAT_FIELDS.items():
        if hasattr(cfg, flat):
            setattr(getattr(out, group), name, getattr(cfg, flat))
    if hasattr(cfg, "python_timeout_s"):  # the CPU limit follows the wall-clock limit
        out.python.cpu_time_s = max(1, int(round(cfg.python_timeout_s)))
    for group in ("zoom", "python", "search"):  # nested sub-configs, if the object has them
        sub = getattr(cfg, group, None)
        if sub is not None and dataclasses.is_dataclass(sub):
            setattr(out, group, sub)
    return out


def _zoom(cfg: ToolSetConfig) -> ImageZoomTool:
    return ImageZoomTool(cfg.zoom)


def _python(cfg: ToolSetConfig) -> PythonSandboxTool:
    return PythonSandboxTool(cfg.python)


def _search(cfg: ToolSetConfig, documents: list[Snippet] | None = None,
            search_provider: SearchProvider | None = None) -> SearchTool:
    provider = search_provider
    if provider is None:
        if documents is None and cfg.search.corpus_path:
            documents = load_documents(cfg.search.corpus_path)
        if documents is None:
            from axpo.tasks.search_facts import SearchTaskConfig, build_corpus
            documents = build_corpus(SearchTaskConfig())
        provider = BM25Index(documents)
    return SearchTool(provider, cfg.search)


# The built-ins register like any plugin tool (axpo.register_tool).
register_tool("image_zoom_in", _zoom)
register_tool("python", _python)
register_tool("search", _search)
# The lockers task's tool (axpo/tasks/lockers.py); not in TOOL_NAMES, which the tiny tokenizer's
# corpus and the default run's tool set are made from.
register_tool("open_locker", OpenLockerTool)


def build_tools(names: list[str], cfg=None, *, search_provider: SearchProvider | None = None,
                documents: list[Snippet] | None = None) -> ToolRegistry:
    """Build the named registered tools. A factory gets the keywords it names among `cfg` (the
    ToolSetConfig), `documents` and `search_provider`. For `search`, the provider is, in order:
    `search_provider`; a BM25 index over `documents`; over `cfg.search.corpus_path` (JSONL); over
    the built-in search task's corpus with default task options."""
    tcfg = tool_set_config(cfg)
    return ToolRegistry([make_tool(name, cfg=tcfg, documents=documents, search_provider=search_provider)
                         for name in names])
