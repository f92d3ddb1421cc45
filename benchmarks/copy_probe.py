"""How fast does the tiny model learn to copy? The skill every built-in tool call needs.

A tool call copies values from the question (numbers into `print(...)`, a cell into a box, a name
into a query) and the answer copies values out of the tool's output. This probe trains a model
from scratch on synthetic sequences `prefix, span, gap, span` with the loss on the second span
only, and reports teacher-forced copy accuracy (argmax == target on the copied tokens, the first
of which is unpredictable) on a fixed held-out batch.

- `--layout variable`: span length 4-16 and a random gap of 0-30 tokens, so the copy must find
  the span by content (induction).
- `--layout fixed`: span length 8 and the same 40-token gap every time, so the copy can use a
  fixed offset (what a fixed question template gives).

    python benchmarks/copy_probe.py --model llama --layout fixed --steps 400
    python benchmarks/copy_probe.py --model qwen3vl --layout variable --steps 400

`--model qwen3vl` is the built-in tiny Qwen3-VL (text only); `--model llama` is a Llama of the
same width and depth (transformers' LlamaForCausalLM), which is much faster on CPU.
Appends a row per evaluation to benchmarks/results/copy_probe.jsonl. The sequences are the ones
the built-in run's copy pre-training stage trains on (`axpo.pretrain.CopySequences`).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, append_row, env_info, timestamp  # noqa: E402

from axpo.pretrain import CopySequences, copy_accuracy  # noqa: E402


def build(model: str, theta: float | None = None):
    """(model, processor). theta=None keeps the model's default."""
    from axpo.models import build_tiny_model, build_tiny_processor

    proc = build_tiny_processor()
    tok = proc.tokenizer
    if model == "qwen3vl":
        net = build_tiny_model(processor=proc)  # the same seed-0 model the built-in run starts from
        if theta is not None:
            net.config.text_config.rope_parameters["rope_theta"] = theta
            # The rotary embedding caches its inverse frequencies at construction: rebuild it.
            rotary = net.model.language_model.rotary_emb
            net.model.language_model.rotary_emb = type(rotary)(config=net.config.text_config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        net = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, intermediate_size=384, rope_theta=theta or 1e4))
    return net, proc


def copy_step(net, opt, x: torch.Tensor, m: torch.Tensor) -> float:
    """One optimiser step on the loss of the copied tokens (mask m); returns the loss."""
    logits = net(input_ids=x).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
    mask = m[:, 1:].float()
    loss = -(logp * mask).sum() / mask.sum()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["qwen3vl", "llama"], default="llama")
    ap.add_argument("--layout", choices=["variable", "fixed"], default="fixed")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rope-theta", type=float, default=1e4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    net, proc = build(args.model, args.rope_theta)
    seqs = CopySequences(proc.tokenizer)
    held_x, held_m = seqs.tensors(random.Random(999), 64, args.layout)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95))
    rng, t0 = random.Random(0), time.time()
    for step in range(1, args.steps + 1):
        x, m = seqs.tensors(rng, args.batch, args.layout)
        loss = copy_step(net, opt, x, m)
        if step % args.every == 0 or step == args.steps:
            acc = copy_accuracy(net, held_x, held_m)
            print(f"step {step}: train loss {loss:.3f}, held-out copy accuracy {acc:.3f}, "
                  f"{time.time() - t0:.0f} s", flush=True)
            append_row(os.path.join(RESULTS_DIR, "copy_probe.jsonl"), {
                "model": args.model, "layout": args.layout, "step": step, "lr": args.lr,
                "rope_theta": args.rope_theta, "batch": args.batch, "copy_accuracy": acc,
                "seconds": time.time() - t0, "timestamp": timestamp(), "env": env_info()})


if __name__ == "__main__":
    main()
