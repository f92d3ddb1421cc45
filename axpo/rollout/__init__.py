"""Built-in rollout engine: paged KV cache, block manager (C++ with a Python fallback), M-RoPE
positions for chunked prefill, cascade decode attention, sampling.

    from axpo.rollout import Engine, SamplingParams
"""

from axpo.rollout.engine import Engine
from axpo.rollout.sampling import Completion, SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion"]
