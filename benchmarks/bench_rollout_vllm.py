"""Rollout throughput of the vLLM backend (axpo/rollout/vllm_engine.py) on the workloads of
bench_rollout.py, and the same workloads on the built-in engine for a side-by-side table.

    .venv-vllm/bin/python benchmarks/bench_rollout_vllm.py             # vLLM (the second environment)
    .venv/bin/python benchmarks/bench_rollout_vllm.py --engine builtin # the built-in engine, same rows
    .venv/bin/python benchmarks/bench_rollout_vllm.py --engine generate # Hugging Face generate(), text rows

Model: bench_rollout.py's small Qwen3-VL (4 layers, hidden 256, 8 query / 4 KV heads of 32, MLP 768,
fp32, random init), saved as a Hugging Face folder for vLLM. Workloads:
- fork: K=8 branches of D=64 sampled tokens (temperature 1, no stop tokens) from a prefix of P
  random text tokens, P in 512..4096, plus P=2048 with a 224x224 image at the start.
  * `cold`: the prefix is new (vLLM: prefix cache reset first; built-in: add + fork): one
    prefill, then K rows decode.
  * `warm`: AXPO's resampling of a live rollout: `fork_at(rollout, P, K)` then `generate`
    (vLLM: the prefix blocks are in the prefix cache; built-in: the KV is already in the pool).
  Per row: median seconds, tokens/s = K*D / time, decode tokens/s = K*(D-1) / (t[D] - t[1]), and
  for vLLM the prompt tokens served from the prefix cache (`num_cached_tokens`).
- decode64: 64 rows with distinct 128-token prompts, 64 sampled tokens each (one generate call),
  decode tokens/s = 64*63 / (t[64] - t[1]).
Rows are appended to benchmarks/results/bench_rollout_vllm.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, append_row, env_info, format_table, time_fn, timestamp  # noqa: E402

from axpo.models import TinyModelConfig, build_tiny_model, build_tiny_processor  # noqa: E402
from axpo.rollout.sampling import SamplingParams  # noqa: E402

OUT = os.path.join(RESULTS_DIR, "bench_rollout_vllm.jsonl")
CFG = TinyModelConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                      intermediate_size=768)
K, D = 8, 64
ROWS64, PROMPT64 = 64, 128


def prefix_ids(p: int, processor, with_image: bool):
    """bench_rollout.py's prefixes (same seeds, same tokens)."""
    g = torch.Generator().manual_seed(p)
    if not with_image:
        return torch.randint(0, 700, (p,), generator=g).tolist(), {}
    from PIL import Image

    img = Image.fromarray((torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy())
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img], return_tensors="pt")
    head = enc["input_ids"][0].tolist()
    ids = head + torch.randint(0, 700, (p - len(head),), generator=g).tolist()
    return ids, {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}


def make_engine(kind: str, model, processor, workdir: str):
    if kind == "builtin":
        from axpo.rollout.engine import Engine

        return Engine(model, block_size=16, max_kv_tokens=K * (4096 + D + 16) + ROWS64 * (PROMPT64 + D + 16))
    from axpo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model, processor, workdir=workdir, dtype="float32", max_model_len=4096 + D + 16,
                      max_images=1, kv_cache_bytes=2 << 30, max_num_seqs=ROWS64)


def reset_cache(eng):
    if hasattr(eng, "llm"):
        eng.llm.reset_prefix_cache()


def decode_rate(tokens: int, full: float, one: float):
    """tokens / (t[D] - t[1]), or None when load noise makes the difference meaningless."""
    return tokens / (full - one) if full - one > 0.05 * full else None


def bench_fork(eng, kind, processor, p, with_image, repeats):
    ids, mm = prefix_ids(p, processor, with_image)
    params = lambda n: [SamplingParams(temperature=1.0, max_tokens=n, seed=i) for i in range(K)]  # noqa: E731
    rows = {}
    cached = {}

    def cold(n):
        reset_cache(eng)
        parent = eng.add(ids, **mm)
        seqs = eng.fork(parent, K)
        eng.free(parent)
        outs = eng.generate(seqs, params(n))
        assert all(len(o.token_ids) == n for o in outs)
        cached["cold"] = list(getattr(eng, "last_cached_tokens", []))
        eng.free_many(seqs)

    live = eng.add(ids + [1] * 8, **mm)
    if kind == "vllm":      # the live rollout's blocks are in the prefix cache, as after its rollout
        probe = eng.fork(live, 1)
        eng.generate(probe, [SamplingParams(max_tokens=1, seed=0)])
        eng.free_many(probe)

    def warm(n):
        seqs = eng.fork_at(live, p, K)
        outs = eng.generate(seqs, params(n))
        assert all(len(o.token_ids) == n for o in outs)
        cached["warm"] = list(getattr(eng, "last_cached_tokens", []))
        eng.free_many(seqs)

    reps = repeats if p < 4096 else max(1, repeats - 1)
    for name, fn in (("cold", cold), ("warm", warm)):
        full = time_fn(lambda: fn(D), warmup=1, repeats=reps)
        one = time_fn(lambda: fn(1), warmup=0, repeats=reps)
        rows[name] = dict(full, tokens_per_s=K * D / full["median_s"],
                          decode_tokens_per_s=decode_rate(K * (D - 1), full["median_s"], one["median_s"]),
                          first_token_s=one["median_s"], cached_tokens_per_branch=cached.get(name) or None,
                          cached_share=(sum(cached[name]) / (K * p)) if cached.get(name) else None)
    eng.free(live)
    return rows


def bench_generate_fork(model, p, repeats):
    """Hugging Face `generate(num_return_sequences=K)` from the prefix: the baseline without KV
    forking (the K rows copy the prefix cache; nothing persists between calls, so only `cold`)."""
    ids, _ = prefix_ids(p, None, False)
    x = torch.tensor([ids])

    def run(n):
        torch.manual_seed(0)
        out = model.generate(x, do_sample=True, num_return_sequences=K, max_new_tokens=n, min_new_tokens=n,
                             top_k=0, top_p=1.0, pad_token_id=0)
        assert out.shape == (K, p + n)

    full = time_fn(lambda: run(D), warmup=1, repeats=repeats)
    one = time_fn(lambda: run(1), warmup=0, repeats=repeats)
    return {"cold": dict(full, tokens_per_s=K * D / full["median_s"], first_token_s=one["median_s"],
                         decode_tokens_per_s=decode_rate(K * (D - 1), full["median_s"], one["median_s"]),
                         cached_tokens_per_branch=None, cached_share=None)}


def bench_generate_decode64(model, repeats):
    g = torch.Generator().manual_seed(64)
    x = torch.tensor([torch.randint(0, 700, (PROMPT64,), generator=g).tolist() for _ in range(ROWS64)])

    def run(n):
        torch.manual_seed(0)
        out = model.generate(x, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0, top_p=1.0,
                             pad_token_id=0)
        assert out.shape == (ROWS64, PROMPT64 + n)

    full = time_fn(lambda: run(D), warmup=1, repeats=repeats)
    one = time_fn(lambda: run(1), warmup=0, repeats=repeats)
    return dict(full, tokens_per_s=ROWS64 * D / full["median_s"], first_token_s=one["median_s"],
                decode_tokens_per_s=decode_rate(ROWS64 * (D - 1), full["median_s"], one["median_s"]))


def bench_decode64(eng, repeats):
    g = torch.Generator().manual_seed(64)
    prompts = [torch.randint(0, 700, (PROMPT64,), generator=g).tolist() for _ in range(ROWS64)]

    def run(n):
        reset_cache(eng)
        seqs = [eng.add(x) for x in prompts]
        outs = eng.generate(seqs, [SamplingParams(temperature=1.0, max_tokens=n, seed=i) for i in range(ROWS64)])
        assert all(len(o.token_ids) == n for o in outs)
        eng.free_many(seqs)

    full = time_fn(lambda: run(D), warmup=1, repeats=repeats)
    one = time_fn(lambda: run(1), warmup=0, repeats=repeats)
    return dict(full, tokens_per_s=ROWS64 * D / full["median_s"], first_token_s=one["median_s"],
                decode_tokens_per_s=decode_rate(ROWS64 * (D - 1), full["median_s"], one["median_s"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["vllm", "builtin", "generate"], default="vllm",
                    help="generate: Hugging Face generate() on the same model (text prefixes only)")
    ap.add_argument("--prefixes", default="512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one 512-token prefix, one repeat, no image")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the built-in engine (vLLM on CPU picks its own: one per core it "
                         "does not reserve for its scheduler, 1 on a 2-core machine)")
    ap.add_argument("--skip-fork", action="store_true", help="only the 64 x 64 decode row")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    prefixes = [512] if args.quick else [int(x) for x in args.prefixes.split(",")]
    repeats = 1 if args.quick else args.repeats
    processor = build_tiny_processor(CFG)
    model = build_tiny_model(0, CFG, processor).eval()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as workdir:
        eng = make_engine(args.engine, model, processor, workdir) if args.engine != "generate" else None
        env = dict(env_info(), quick=args.quick, torch_threads_after_init=torch.get_num_threads())
        if args.engine == "vllm":
            import vllm

            env.update(vllm=vllm.__version__, vllm_block_size=eng.block_size, init_s=eng.init_seconds)
        import transformers

        env["transformers"] = transformers.__version__
        model_desc = f"qwen3vl L{CFG.num_layers} H{CFG.hidden_size} heads {CFG.num_heads}/{CFG.num_kv_heads}x{CFG.head_dim}"
        rows = []
        cases = [(p, False) for p in prefixes] + ([] if args.no_image or args.quick or eng is None else [(2048, True)])
        cases = [] if args.skip_fork else cases
        for p, img in cases:
            print(f"{args.engine}: prefix {p}{' + image' if img else ''} ...", flush=True)
            res = (bench_generate_fork(model, p, repeats) if eng is None
                   else bench_fork(eng, args.engine, processor, p, img, repeats))
            for mode, r in res.items():
                row = dict(bench="rollout_vllm", engine=args.engine, workload="fork", mode=mode, prefix_tokens=p,
                           branches=K, new_tokens=D, image=img, model=model_desc, dtype="fp32", **r, **env,
                           timestamp=timestamp())
                append_row(OUT, row)
                rows.append(row)
        print(f"{args.engine}: {ROWS64} x {D} decode ...", flush=True)
        r = bench_generate_decode64(model, repeats) if eng is None else bench_decode64(eng, repeats)
        row = dict(bench="rollout_vllm", engine=args.engine, workload="decode64", mode="cold", prefix_tokens=PROMPT64,
                   branches=ROWS64, new_tokens=D, image=False, model=model_desc, dtype="fp32", **r, **env,
                   timestamp=timestamp())
        append_row(OUT, row)
        rows.append(row)
        if hasattr(eng, "close"):
            eng.close()
    for r in rows:
        r["case"] = f"{r['workload']} {r['prefix_tokens']}{'+img' if r['image'] else ''}"
        r["cached"] = "-" if r.get("cached_share") is None else f"{r['cached_share']:.2f}"
        r["decode"] = "-" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.0f}"
    print()
    print(format_table(rows, [("case", "case", None), ("mode", "mode", None), ("median_s", "time s", "{:.3f}"),
                              ("first_token_s", "1-token s", "{:.3f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
                              ("decode", "decode tok/s", None), ("cached", "cached share", None)]))
    print(f"\n{args.engine}: K={K} x D={D}; {env['cpu']} x{env['cpu_count']}, torch {env['torch']}, "
          f"{torch.get_num_threads()} threads; wall {time.time() - t0:.0f} s; rows -> {OUT}")


if __name__ == "__main__":
    main()
