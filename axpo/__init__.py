"""AXPO: Agent eXplorative Policy Optimization for tool-using vision-language agents.

The public extension API (see axpo/registry.py and examples/):

    import axpo

    @axpo.register_tool("lookup")
    class Lookup: ...                        # the Tool protocol: name, schema(), __call__(arguments, ctx)

    @axpo.register_reward("exact")
    def exact(sample, traj) -> float: ...

    axpo.register_task("lockers", spec)      # an axpo.tasks.base.TaskSpec

Then name them in the config (`tools.enabled`, `data.reward`, `data.tasks`) and list the module
that registers them in `plugins`, or pass objects to `axpo.trainer.Trainer`.
"""

__version__ = "0.1.0"

_LAZY = {
    "register_tool": "axpo.registry", "register_reward": "axpo.registry", "register_task": "axpo.registry",
    "TOOLS": "axpo.registry", "REWARDS": "axpo.registry", "TASK_REGISTRY": "axpo.registry",
    "Tool": "axpo.tools.base", "ToolResult": "axpo.tools.base", "ToolContext": "axpo.tools.base",
    "function_schema": "axpo.tools.base", "error_result": "axpo.tools.base",
    "Sample": "axpo.tasks.base", "TaskSpec": "axpo.tasks.base",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    # Lazy: `import axpo` stays cheap (no torch/transformers import) and has no import cycles.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'axpo' has no attribute {name!r}")
