"""Extension points: tools, rewards and tasks are registered by name and named in the config.

    import axpo

    @axpo.register_tool("lookup")
    class Lookup:                         # the Tool protocol of axpo/tools/base.py
        name = "lookup"
        def schema(self): return axpo.function_schema("lookup", "...", {...}, ["key"])
        def __call__(self, arguments, ctx): return axpo.ToolResult(text=...)

    @axpo.register_reward("exact")
    def exact(sample, traj) -> float: ...           # or batched=True: (samples, trajs) -> list[float]

    # config: tools.enabled=[lookup], data.reward=exact, plugins=[my_package.my_plugin]

The built-in tools (image_zoom_in, python, search), the built-in reward (`verify`: the task's
answer check) and the built-in tasks register themselves through the same calls. `plugins` in the
config names modules (or .py files) to import before the config is checked, so every rank of a
torchrun job registers the same things.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError, ValueError):
    """An unknown name; the message lists what is registered. A KeyError for mapping-style
    lookups, a ValueError for callers that validate names."""

    def __str__(self) -> str:   # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """Name -> object (a read-only mapping), with errors that list what is registered."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False):
        """`register(name, obj)`, or `@register(name)` as a decorator. Registering a taken name is an
        error unless `override=True` (a plugin that replaces a built-in says so)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(o: T) -> T:
            if name in self._items and not override and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(self._items[name])}); "
                                 "pass override=True to replace it")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str, default: Any = ...) -> T:
        if name not in self._items:
            if default is not ...:
                return default
            raise RegistryError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}"
                                " (register one with axpo.register_" + self.kind + ", or list its module "
                                "in the config's `plugins`)")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)


def _describe(o: Any) -> str:
    mod = getattr(o, "__module__", "?")
    return f"{mod}.{getattr(o, '__qualname__', type(o).__name__)}"


# ---- tools: name -> factory(tool_set_config, **context) -> Tool ------------------------------
# A factory may be a Tool class (called with no arguments, or with the keyword arguments its
# signature names among: cfg, documents, search_provider) or any callable returning a Tool.

TOOLS: Registry[Callable[..., Any]] = Registry("tool")


def register_tool(name: str, factory: Callable[..., Any] | None = None, *, override: bool = False):
    return TOOLS.register(name, factory, override=override)


def make_tool(name: str, **context):
    """Build the registered tool `name`, passing the context keywords its factory accepts."""
    factory = TOOLS.get(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = context
    else:
        kwargs = {k: v for k, v in context.items() if k in params}
    tool = factory(**kwargs)
    if getattr(tool, "name", None) != name:
        raise ValueError(f"tool {name!r}: its factory built a tool named {getattr(tool, 'name', None)!r}; "
                         "the registered name and the tool's `name` must agree (the model calls it by name)")
    for attr in ("schema", "__call__"):
        if not callable(getattr(tool, attr, None)):
            raise TypeError(f"tool {name!r}: {type(tool).__name__} has no {attr}() (see axpo.tools.base.Tool)")
    return tool


# ---- rewards --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardFn:
    """A registered reward: `fn(sample, trajectory) -> float`, or with `batched=True`
    `fn(samples, trajectories) -> list[float]` (one call per step, e.g. for a reward model)."""

    fn: Callable[..., Any]
    batched: bool = False

    def score(self, samples: list, trajs: list) -> list[float]:
        if self.batched:
            out = list(self.fn(samples, trajs))
            if len(out) != len(trajs):
                raise ValueError(f"batched reward {_describe(self.fn)} returned {len(out)} scores for "
                                 f"{len(trajs)} trajectories")
        else:
            out = [self.fn(s, t) for s, t in zip(samples, trajs)]
        bad = [(i, v) for i, v in enumerate(out) if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            i, v = bad[0]
            raise ValueError(f"reward {_describe(self.fn)} returned {v!r} for trajectory {i}; "
                             "it must return a finite number")
        return [float(v) for v in out]


REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str, fn: Callable[..., Any] | None = None, *, batched: bool = False,
                    override: bool = False):
    def add(f):
        REWARDS.register(name, RewardFn(f, batched), override=override)
        return f

    return add if fn is None else add(fn)


# ---- tasks ----------------------------------------------------------------------------------

TASK_REGISTRY: Registry[Any] = Registry("task")


def register_task(name: str, spec: Any = None, *, override: bool = False):
    """Register a `axpo.tasks.base.TaskSpec` (generator, verifier, demonstration texts)."""
    return TASK_REGISTRY.register(name, spec, override=override)


# ---- plugins --------------------------------------------------------------------------------


def import_plugins(plugins: list[str], base: Path | None = None) -> None:
    """Import each plugin: a module name (`my_pkg.tools`) or a path to a .py file (relative to
    `base`, the config file's folder, else the working directory)."""
    for spec in plugins:
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec)
            if not path.is_absolute():
                cand = (base / path) if base is not None else path
                path = cand if cand.exists() else Path.cwd() / path
            if not path.is_file():
                raise FileNotFoundError(f"plugins: {spec}: no such file")
            name = "axpo_plugin_" + path.stem
            if name in sys.modules:
                continue
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
