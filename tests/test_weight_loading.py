"""axpo.checkpoint.load_weights: the one loader of a DCP checkpoint folder or a Hugging Face folder
into a policy (init_from, the reference policy, evaluation), which the trainer used to write twice
(load_policy/_load_hf_folder and _reference_policy). The multi-rank paths (rank 0 reads, shards
broadcast) run in tests/test_rank0_load.py under torchrun."""

import pytest
import torch

from axpo.checkpoint import Checkpointer, copy_local_weights, export_hf, load_weights
from axpo.distributed import Dist
from axpo.models import build_tiny_model, build_tiny_processor
from axpo.policy import PolicyModel


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One trained-looking model saved both ways: an HF export and a run's DCP checkpoint."""
    root = tmp_path_factory.mktemp("weights")
    proc = build_tiny_processor()
    src = PolicyModel(build_tiny_model(seed=11, processor=proc))
    export_hf(src, proc, root / "hf", Dist())
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    dcp = Checkpointer(root / "run", Dist()).save(src, opt, None, stage="rl", step=1)
    return src, proc, root / "hf", dcp


@pytest.mark.parametrize("kind", ["hf", "dcp"])
def test_either_source_into_a_policy(sources, kind):
    src, proc, hf, dcp = sources
    dst = PolicyModel(build_tiny_model(seed=0, processor=proc))
    with pytest.raises(AssertionError):
        _same_weights(dst, src)                # different to begin with
    load_weights(dst, hf if kind == "hf" else dcp, Dist(), dtype=torch.float32)
    _same_weights(dst, src)


def test_current_weights_copied_by_canonical_name(sources):
    src, proc, _, _ = sources
    dst = PolicyModel(build_tiny_model(seed=0, processor=proc))
    copy_local_weights(dst, src)
    _same_weights(dst, src)


def test_a_path_that_is_no_checkpoint_is_named(tmp_path, sources):
    _, proc, _, _ = sources
    dst = PolicyModel(build_tiny_model(seed=0, processor=proc))
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'nope'}"):
        load_weights(dst, tmp_path / "nope", Dist())
    with pytest.raises(FileNotFoundError, match="neither a DCP checkpoint folder .* nor a Hugging Face folder"):
        load_weights(dst, tmp_path, Dist())
