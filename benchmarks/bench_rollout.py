"""Resampling K continuations from a shared prefix: forked KV vs re-prefill vs `generate`.

    python benchmarks/bench_rollout.py              # prefixes 512..4096 + an image row (CPU: ~3-5 min)
    python benchmarks/bench_rollout.py --quick      # one small prefix, a smoke run

Small Qwen3-VL (4 layers, hidden 256, 8 query / 4 KV heads of 32, MLP 768, fp32), K=8 branches of
D=64 sampled tokens (temperature 1, no stop tokens, so every branch decodes exactly D tokens) from a
prefix of P random text tokens:
- engine_fork: `add(prefix)` (one prefill), `fork(parent, K)`, `generate` - the prefix KV is shared
  and decode reads it once per step for all branches (cascade attention). The prefill is included,
  so this is the cost from scratch; resampling a live rollout through `fork_at` skips even that.
- engine_fork_at_live: `fork_at(rollout, P, K)` of a rollout already in the engine, then
  `generate`: AXPO's resampling step, with no prefill at all.
- engine_reprefill: K separate `add(prefix)` then one batched `generate` (no sharing).
- hf_generate: `model.generate(num_return_sequences=K, do_sample=True)` with a DynamicCache
  (it expands the prompt to K rows before the prefill).
The ideal speedup of sharing over generate, (K*P + D) / (P + D) (the prefix forwarded once instead
of K times), is printed next to the measured one. Decode throughput at
batch K: the engine's `generate` call alone; for transformers, (t[D tokens] - t[1 token]) spread
over K*(D-1) tokens. KV blocks: blocks in use after decoding vs the bound prefix + K x continuation
blocks. Rows are appended to benchmarks/results/bench_rollout.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, _percentile, append_row, env_info, format_table, timestamp  # noqa: E402

from axpo.models import TinyModelConfig, build_tiny_model, build_tiny_processor  # noqa: E402
from axpo.rollout import Engine, SamplingParams  # noqa: E402
from axpo.rollout.block_manager import HAS_C  # noqa: E402

OUT = os.path.join(RESULTS_DIR, "bench_rollout.jsonl")
CFG = TinyModelConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                      intermediate_size=768)
K, D, BLOCK = 8, 64, 16


def prefix_ids(p: int, processor, with_image: bool):
    g = torch.Generator().manual_seed(p)
    if not with_image:
        return torch.randint(0, 700, (p,), generator=g).tolist(), {}
    from PIL import Image

    img = Image.fromarray((torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy())
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img], return_tensors="pt")
    head = enc["input_ids"][0].tolist()
    ids = head + torch.randint(0, 700, (p - len(head),), generator=g).tolist()
    return ids, {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}


def bench_prefix(model, processor, p: int, repeats: int, with_image: bool, env: dict) -> list[dict]:
    ids, mm = prefix_ids(p, processor, with_image)
    image_token = model.config.image_token_id
    params = [SamplingParams(temperature=1.0, max_tokens=D, seed=i) for i in range(K)]
    eng = Engine(model, block_size=BLOCK, max_kv_tokens=(K + 1) * (p + D + BLOCK) + BLOCK)
    bound = -(-p // BLOCK) + K * -(-D // BLOCK)
    reps = repeats if p < 4096 else max(1, repeats - 1)
    rows = []

    live = None
    live_blocks, tail_blocks = -(-(p + 8) // BLOCK), -(-8 // BLOCK)

    def engine_run(mode: str, info: dict):
        parent = None
        if mode == "fork":
            parent = eng.add(ids, **mm)
            seqs = eng.fork(parent, K)
        elif mode == "fork_at":
            before = eng.stats["prefill_tokens"]
            seqs = eng.fork_at(live, p, K)
            assert eng.stats["prefill_tokens"] == before
        else:
            seqs = [eng.add(ids, **mm) for _ in range(K)]
        t0 = time.perf_counter()
        outs = eng.generate(seqs, params)
        info.setdefault("decode_s", []).append(time.perf_counter() - t0)
        assert all(len(o.token_ids) == D for o in outs)
        # Branch memory only: not the live rollout's blocks (fork_at: its own tail, the rest is shared).
        info["blocks"] = eng.stats["blocks_used"] - (tail_blocks if mode == "fork_at" else live_blocks)
        eng.free_many(seqs + ([parent] if parent is not None else []))

    x = torch.tensor([ids])
    hf_kw = {}
    if mm:
        hf_kw = dict(mm, mm_token_type_ids=(x == image_token).long(), attention_mask=torch.ones_like(x))

    def hf(n):
        with torch.no_grad():
            out = model.generate(x, do_sample=True, num_return_sequences=K, max_new_tokens=n, min_new_tokens=n,
                                 top_k=0, top_p=1.0, temperature=1.0, **hf_kw)
        assert out.shape == (K, p + n)

    # A rollout that is already in the engine (e.g. a finished trajectory): its prefix KV exists,
    # so resampling from token p needs no prefill at all.
    live = eng.add(ids + [1] * 8, **mm)
    infos = {m: {} for m in ("fork", "fork_at", "reprefill")}
    methods = {"engine_fork": lambda: engine_run("fork", infos["fork"]),
               "engine_fork_at_live": lambda: engine_run("fork_at", infos["fork_at"]),
               "engine_reprefill": lambda: engine_run("reprefill", infos["reprefill"]),
               "hf_generate": lambda: hf(D), "hf_prefill_only": lambda: hf(1)}
    # Interleaved: one run of every method per round (after a warm-up round), so a machine whose
    # load changes over the run slows all methods alike; wall and CPU (process) time per run.
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for r in range(reps + 1):
        for m, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r:
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    eng.free(live)

    def stats(m):
        return {"median_s": statistics.median(wall[m]), "p20_s": _percentile(wall[m], 0.2),
                "p80_s": _percentile(wall[m], 0.8), "cpu_median_s": statistics.median(cpu[m]), "repeats": reps,
                "warmup": 1}

    results = {}
    for name, mode in (("engine_fork", "fork"), ("engine_fork_at_live", "fork_at"), ("engine_reprefill", "reprefill")):
        info = infos[mode]
        dec = statistics.median(info["decode_s"][1:])
        results[name] = dict(stats(name), decode_tokens_per_s=K * D / dec, kv_blocks_used=info["blocks"],
                             kv_tokens_held=info["blocks"] * BLOCK)
    t_full, t_one = stats("hf_generate"), stats("hf_prefill_only")
    results["hf_generate"] = dict(t_full, decode_tokens_per_s=K * (D - 1) / max(1e-9, t_full["median_s"] - t_one["median_s"]),
                                  kv_blocks_used=None, kv_tokens_held=K * (p + D), prefill_only_s=t_one["median_s"])

    ideal = (K * p + D) / (p + D)
    t_gen = results["hf_generate"]["median_s"]
    c_gen = results["hf_generate"]["cpu_median_s"]
    for name, r in results.items():
        row = dict(bench="rollout", method=name, prefix_tokens=p, branches=K, new_tokens=D, image=with_image,
                   block_size=BLOCK, kv_blocks_bound=bound if name.startswith("engine_fork") else None,
                   tokens_per_s=K * D / r["median_s"], speedup_vs_generate=t_gen / r["median_s"],
                   cpu_speedup_vs_generate=c_gen / r["cpu_median_s"],
                   ideal_speedup=ideal, model=f"qwen3vl L{CFG.num_layers} H{CFG.hidden_size} "
                   f"heads {CFG.num_heads}/{CFG.num_kv_heads}x{CFG.head_dim}", dtype="fp32",
                   block_manager="cpp" if HAS_C else "python", **r, **env, timestamp=timestamp())
        append_row(OUT, row)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one 256-token prefix, one repeat")
    ap.add_argument("--prefixes", default="512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-image", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    prefixes = [256] if args.quick else [int(x) for x in args.prefixes.split(",")]
    repeats = 1 if args.quick else args.repeats
    processor = build_tiny_processor(CFG)
    model = build_tiny_model(0, CFG, processor).eval()
    env = dict(env_info(), quick=args.quick)
    t0 = time.time()
    rows = []
    cases = [(p, False) for p in prefixes]
    if not args.no_image:
        cases.append((256 if args.quick else 2048, True))
    for p, img in cases:
        print(f"prefix {p}{' + image' if img else ''} ...", flush=True)
        rows += bench_prefix(model, processor, p, repeats, img, env)
    for r in rows:
        r["p"] = f"{r['prefix_tokens']}{'+img' if r['image'] else ''}"
        r["spread"] = f"{r['p20_s']:.2f}-{r['p80_s']:.2f}"
        used, bound = r["kv_blocks_used"], r["kv_blocks_bound"]
        r["blocks"] = "-" if used is None else (f"{used}/{bound}" if bound is not None else str(used))
    print()
    print(format_table(rows, [("p", "prefix", None), ("method", "method", None), ("median_s", "time s", "{:.3f}"),
                              ("spread", "p20-p80", None), ("tokens_per_s", "tok/s", "{:.0f}"),
                              ("decode_tokens_per_s", "decode tok/s", "{:.0f}"),
                              ("speedup_vs_generate", "speedup", "{:.2f}x"),
                              ("cpu_speedup_vs_generate", "CPU-time speedup", "{:.2f}x"),
                              ("ideal_speedup", "ideal", "{:.2f}x"),
                              ("blocks", "KV blocks used/bound", None), ("kv_tokens_held", "KV tokens held", None)]))
    print(f"\nK={K} branches x D={D} tokens, block {BLOCK}, {env['cpu']} x{env['cpu_count']}, "
          f"torch {env['torch']}, {torch.get_num_threads()} threads; wall {time.time() - t0:.0f} s; rows -> {OUT}")
    at = {r["method"]: r for r in rows if r["prefix_tokens"] == 2048 and not r["image"]}
    if at:
        f, g = at["engine_fork"], at["hf_generate"]
        print(f"targets at P=2048: fork {f['speedup_vs_generate']:.2f}x generate (CPU time {f['cpu_speedup_vs_generate']:.2f}x; "
              f">= 5x: {f['speedup_vs_generate'] >= 5}); decode {f['decode_tokens_per_s']:.0f} vs {g['decode_tokens_per_s']:.0f} "
              f"tok/s (no worse: {f['decode_tokens_per_s'] >= g['decode_tokens_per_s']}); KV blocks "
              f"{f['kv_blocks_used']} <= {f['kv_blocks_bound']}: {f['kv_blocks_used'] <= f['kv_blocks_bound']}")


if __name__ == "__main__":
    main()
