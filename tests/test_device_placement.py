"""Tensors that meet the model, a kernel or a collective are built on the rank's device.

Checked on devices this CPU-only machine can make: `meta` (shapes only) and fake CUDA tensors
(`FakeTensorMode`, which raises on any CPU/CUDA mix). The fused kernels' own fake-CUDA tests are in
tests/kernels/test_custom_ops.py, the update's in tests/test_update_device.py."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from axpo.distributed import Dist, _scalar_tensor, backend_for
from axpo.policy import pack

SEQS = [{"tokens": [5, 6, 7, 9], "pixel_values": [], "grids": []},
        {"tokens": [5, 8], "pixel_values": [], "grids": []}]


def test_pack_builds_on_the_target_device():
    b = pack(SEQS, 0, 9, [0, 1], device="meta")
    for t in (b.input_ids, b.attention_mask, b.mm_token_type_ids):
        assert t.device.type == "meta" and t.shape == (2, 4)
    cpu = pack(SEQS, 0, 9, [0, 1])
    assert cpu.input_ids.tolist() == [[5, 6, 7, 9], [5, 8, 0, 0]]
    assert cpu.mm_token_type_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]
    assert cpu.to("meta").input_ids.device.type == "meta"


def test_pack_on_fake_cuda_and_images_follow():
    with FakeTensorMode():
        pixels = torch.empty(4, 1536, device="cuda")
        seqs = [{"tokens": [5, 9, 9, 7], "pixel_values": [pixels], "grids": [(1, 2, 2)]}]
        b = pack(seqs, 0, 9, [0], device="cuda")
        assert {t.device.type for t in (b.input_ids, b.attention_mask, b.mm_token_type_ids,
                                         b.pixel_values, b.image_grid_thw)} == {"cuda"}
        # A CPU tensor meeting the batch is caught (what a stray CPU mask would do in the loss).
        try:
            b.input_ids * torch.ones(1, 4, dtype=torch.long)
        except Exception as e:   # FakeTensorDeviceMismatchError / RuntimeError
            assert "device" in str(e).lower()
        else:
            raise AssertionError("a CPU/CUDA mix went unnoticed")


def test_collective_scalars_live_on_the_rank_device():
    assert _scalar_tensor([1.0, 2.0], torch.float64, Dist(device=torch.device("meta"))).device.type == "meta"
    assert backend_for(torch.device("cuda", 0)) == "cuda:nccl,cpu:gloo"
    assert backend_for(torch.device("cpu")) == "gloo"
