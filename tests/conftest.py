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


@pytest.fixture
def two_gloo_ranks(tmp_path):
    """Run a Python snippet as two gloo ranks (plain processes sharing a file:// rendezvous); the
    snippet gets `rank` and `init` as argv[1], argv[2]. Returns each rank's last stdout line."""
    import subprocess
    import sys

    def run(code: str) -> list[str]:
        init = f"file://{tmp_path / 'pg'}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), init], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
        return [out.strip().splitlines()[-1] for out, _ in outs]

    return run
