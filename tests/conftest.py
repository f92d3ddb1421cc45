"""Shared fixtures. Tests run on CPU by default; `gpu`-marked tests skip without CUDA."""

import os

import pytest
import torch

# Two cores: keep intra-op threads predictable so timings and determinism don't depend on the box.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_processor():
    from axpo.models import build_tiny_processor

    return build_tiny_processor()


@pytest.fixture(scope="session")
def tiny_model(tiny_processor):
    """Session-wide tiny Qwen3-VL in eval mode. Tests that train must build their own copy."""
    from axpo.models import build_tiny_model

    model = build_tiny_model(seed=0, processor=tiny_processor)
    model.eval()
    return model
