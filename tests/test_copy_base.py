"""The shipped copy-pretrained tiny base (axpo/copy_base.py, axpo/assets/tiny_copy_base.safetensors):
it fits the built-in tokenizer and sizes, it copies (held-out copy accuracy measured here, against
the random base), the trainer starts from it by default, and every misfit is a clear error before
any stage runs."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from axpo.config import ConfigError, load_config
from axpo.copy_base import (ASSET, CopyBaseError, load_copy_base, package, read_metadata, sizes_mismatch,
                            tokenizer_fingerprint)
from axpo.models import build_tiny_processor, load_model_and_processor
from axpo.pretrain import CopySequences, copy_accuracy
from axpo.tiny import TinyModelConfig


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def test_asset_fits_the_builtin_tokenizer_and_sizes(processor):
    meta = read_metadata()
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(processor.tokenizer), (
        "the built-in tokenizer no longer matches the shipped base: remake it (axpo/copy_base.py)")
    assert sizes_mismatch(TinyModelConfig()) is None
    assert int(meta["pretrain_steps"]) >= 3000
    # Text weights only, fp32, every text parameter of the model.
    tensors = load_file(str(ASSET))
    assert tensors and all(k.startswith(("model.language_model.", "lm_head.")) for k in tensors)
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_shipped_base_copies_and_the_random_one_does_not(processor):
    x, m = CopySequences(processor.tokenizer).held_out()
    copy, _ = load_model_and_processor("tiny", tiny_base="copy")
    rand, _ = load_model_and_processor("tiny", tiny_base="random")
    acc_copy, acc_rand = copy_accuracy(copy.eval(), x, m), copy_accuracy(rand.eval(), x, m)
    assert acc_copy == pytest.approx(float(read_metadata()["copy_accuracy"]), abs=1e-3)
    assert acc_copy > 0.4 and acc_rand < 0.05
    # Only the text weights come from the asset: the vision tower is the seed's, as before.
    for k, v in rand.state_dict().items():
        if k.startswith("model.visual."):
            assert torch.equal(v, copy.state_dict()[k])


def test_trainer_default_starts_from_the_shipped_base(tmp_path):
    from axpo.trainer import Trainer

    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "pretrain.steps=0", "sft.steps=0", "rl.steps=0",
                             "trainer.evaluate=false", "data.train_size=4", "data.eval_size=2", "data.sft_size=4"])
    assert cfg.model.tiny_base == "copy" and cfg.pretrain.steps == 0
    trainer = Trainer(cfg)
    try:
        want = load_file(str(ASSET))
        have = {k[3:] if k.startswith("hf.") else k: v for k, v in trainer.policy.state_dict().items()}
        key = "model.language_model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(have[key].full_tensor() if hasattr(have[key], "full_tensor") else have[key], want[key])
        engine_w = dict(trainer.engine.model.named_parameters())[key]
        assert torch.equal(engine_w.detach().cpu(), want[key])
    finally:
        trainer.close(clean=True)


def test_other_tiny_sizes_are_a_config_error_naming_the_field():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.tiny.hidden_size=64"])
    assert "model.tiny_base" in str(e.value) and "random" in str(e.value)
    cfg = load_config(None, ["model.tiny.hidden_size=64", "model.tiny_base=random"])   # the way out
    assert cfg.model.tiny.hidden_size == 64
    assert "model.tiny.hidden_size = 64 (the base has 128)" in sizes_mismatch(cfg.model.tiny)


def _rewrite(src, dst, **meta_changes):
    tensors = load_file(str(src))
    meta = {**read_metadata(src), **meta_changes}
    save_file(tensors, str(dst), metadata=meta)


def test_another_tokenizer_is_refused_with_the_fix(processor, tmp_path):
    bad = tmp_path / "base.safetensors"
    _rewrite(ASSET, bad, tokenizer_sha256="0" * 64)
    model, _ = load_model_and_processor("tiny", tiny_base="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CopyBaseError, match="another tokenizer.*model.tiny_base=random"):
        load_copy_base(model, processor.tokenizer, TinyModelConfig(), bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # nothing loaded


def test_damaged_or_foreign_files_are_refused(processor, tmp_path):
    model, _ = load_model_and_processor("tiny", tiny_base="random")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(CopyBaseError, match="cannot read"):
        load_copy_base(model, processor.tokenizer, TinyModelConfig(), junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(CopyBaseError, match="not an axpo-tiny-copy-base"):
        load_copy_base(model, processor.tokenizer, TinyModelConfig(), foreign)
    # A tensor of the wrong shape: named, and refused before anything is copied.
    wrong = tmp_path / "wrong.safetensors"
    tensors = load_file(str(ASSET))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].contiguous()
    save_file(tensors, str(wrong), metadata=read_metadata(ASSET))
    with pytest.raises(CopyBaseError, match="lm_head.weight"):
        load_copy_base(model, processor.tokenizer, TinyModelConfig(), wrong)


def test_header_is_read_without_loading_tensors():
    # The config check reads only the JSON header: the first 8 bytes are its length.
    with open(ASSET, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert header["__metadata__"] == read_metadata()


@pytest.mark.slow
def test_package_writes_a_base_from_a_copy_pretraining_run(tmp_path):
    """The documented way to remake the asset, on a few steps: a real copy pre-training run (random
    base), then `package`, whose output the loader takes and whose recorded accuracy is measured."""
    from axpo.train import main

    run = tmp_path / "run"
    assert main(["--output-dir", str(run), "model.tiny_base=random", "pretrain.steps=6",
                 "pretrain.questions_per_step=8", "pretrain.checkpoint_every=0", "sft.steps=0", "rl.steps=0",
                 "trainer.evaluate=false", "data.train_size=4", "data.eval_size=2", "data.sft_size=4"]) == 0
    out = tmp_path / "base.safetensors"
    meta = package(run, out)
    assert meta["pretrain_steps"] == "6" and 0.0 <= float(meta["copy_accuracy"]) < 0.2
    assert read_metadata(out) == meta
    proc = build_tiny_processor()
    model, _ = load_model_and_processor("tiny", tiny_base="random")
    load_copy_base(model, proc.tokenizer, TinyModelConfig(), out)
    hf = load_file(str(next((run / "hf").glob("*.safetensors"))))
    key = "model.language_model.norm.weight"
    assert torch.equal(model.state_dict()[key], hf[key])
