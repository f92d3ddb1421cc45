"""Copy pre-training: the synthetic sequences are what they claim (the masked span is a copy of an
earlier span), are reproducible from (seed, step), and the trainer's stage lowers the copy loss."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from axpo.pretrain import CopySequences, copy_accuracy

ROOT = Path(__file__).resolve().parents[1]


def _copied_span(seq, mask):
    idx = [i for i, m in enumerate(mask) if m]
    assert idx == list(range(idx[0], idx[-1] + 1)), "mask must be one contiguous span"
    return idx[0], seq[idx[0]:idx[-1] + 1]


@pytest.mark.parametrize("step", [0, 1, 2, 7])
def test_masked_span_is_a_copy_of_an_earlier_span(tiny_processor, step):
    seqs = CopySequences(tiny_processor.tokenizer)
    special = set(tiny_processor.tokenizer.all_special_ids)
    batch = seqs.step_batch(seed=3, step=step, size=32)
    fixed = step % 2 == 0
    for seq, mask in batch:
        assert len(seq) == len(mask) <= seqs.seq_len and not special & set(seq)
        start, span = _copied_span(seq, mask)
        assert (4 <= len(span) <= 16) and (len(span) == 8 or not fixed)
        if fixed:  # the same 40-token gap every time: the copy sits at a fixed offset
            assert seq[start - 48:start - 40] == span and seq[start - 40:start] == seqs.fixed_gap
        else:      # somewhere earlier, to be found by content
            n = len(span)
            assert any(seq[i:i + n] == span for i in range(0, start - n + 1))


def test_step_batches_are_reproducible_and_differ_by_step(tiny_processor):
    a, b = CopySequences(tiny_processor.tokenizer), CopySequences(tiny_processor.tokenizer)
    assert a.step_batch(0, 5, 8) == b.step_batch(0, 5, 8)
    assert a.step_batch(0, 5, 8) != a.step_batch(0, 7, 8)
    assert a.step_batch(0, 5, 8) != a.step_batch(1, 5, 8)
    with pytest.raises(ValueError, match="layout"):
        a.make(random.Random(0), 1, "diagonal")


def test_copy_accuracy_of_untrained_model_is_low(tiny_processor, tiny_model):
    x, m = CopySequences(tiny_processor.tokenizer).held_out(16)
    assert x.shape == m.shape == (16, 96)
    assert 0.0 <= copy_accuracy(tiny_model, x, m) < 0.1


def test_pretrain_stage_lowers_copy_loss(tmp_path):
    """40 steps of the trainer's pre-training stage (one process, smoke model): the copy loss of
    the last 10 steps is clearly below that of the first 10."""
    out = tmp_path / "pre"
    r = subprocess.run(
        [sys.executable, str(ROOT / "axpo" / "train.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
         "--output-dir", str(out), "pretrain.steps=40", "pretrain.questions_per_step=16",
         "pretrain.checkpoint_every=0", "sft.steps=0", "rl.steps=0", "trainer.evaluate=false",
         "trainer.plots=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [row["loss"] for row in rows if row["stage"] == "pretrain"]
    assert len(loss) == 40
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < first - 0.5, (first, last)
