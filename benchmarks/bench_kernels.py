"""Benchmark of the fused ops against torch eager, torch.compile and Liger, with their floors.

    python benchmarks/bench_kernels.py            # both cases, full size (CPU: ~5-7 minutes)
    python benchmarks/bench_kernels.py --quick    # small shapes, a smoke run in seconds

(a) logprob_entropy, N=2048 tokens, V=151936, fp32: forward and forward+backward (gradient through
    logp and entropy). Floor: the machine's copy bandwidth, measured in the same run; the op reads
    the logits once forward and reads + writes them once backward, so achieved GB/s is
    bytes moved / time, reported as a fraction of the copy rate.
(b) fused LM head + clipped policy loss (token-mean, beta=0.04 k3 KL), forward+backward,
    N=4096 (8 x 512), H=1024, V=151936, fp32: `axpo_fused` is `linear_policy_loss` (one op,
    gradients computed in the forward, 3 GEMMs), `axpo` is `linear_logprob_entropy` followed by
    `clipped_policy_loss` (two ops, the head's backward recomputes the logits: 4 GEMMs); against
    Liger's LigerFusedLinearGRPOLoss (loss_type="dapo" is the same token-mean), torch eager and
    torch.compile, and the bare three GEMMs (logits, dX, dW) timed alone in the same process - the
    floor of any head that computes these gradients.
Each provider gets a warm-up call (torch.compile compiles there), then timed repeats; big-case
repeats are few (3, eager 1) to keep the whole run short, and the table says how many.
On a shared machine use `--interleave`: the floor and every provider then run in rounds (floor,
provider, provider, ..., floor, ...), so a load change hits both sides of a ratio, and each row
also carries the median of the per-round ratios (`ratio_paired_median`).

    python benchmarks/bench_kernels.py --cases b --providers axpo_fused,liger_grpo --interleave --reps 3

Rows are appended to benchmarks/results/bench_kernels.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    RESULTS_DIR,
    _MemoryProbe,
    append_row,
    env_info,
    format_table,
    measure_copy_bandwidth,
    time_fn,
    timestamp,
)

from axpo.kernels import clipped_policy_loss, linear_logprob_entropy, linear_policy_loss, logprob_entropy  # noqa: E402
from axpo.kernels.reference import clipped_policy_loss_ref, linear_logprob_entropy_ref, logprob_entropy_ref  # noqa: E402

OUT = os.path.join(RESULTS_DIR, "bench_kernels.jsonl")
ROWS = []


def record(env, **row):
    row = {**row, **env, "timestamp": timestamp()}
    ROWS.append(row)
    append_row(OUT, row)
    return row


def skipped(env, op, provider, shape, dtype, reason, **extra):
    print(f"  skip {op} / {provider}: {reason}", flush=True)
    return record(env, op=op, provider=provider, shape=shape, dtype=dtype, skipped=reason, **extra)


# --------------------------------------------------------------------------------------------
# (a) logprob_entropy over stored logits
# --------------------------------------------------------------------------------------------


def case_a(env, dev, N, V, quick):
    dtype = torch.float32
    shape = f"N={N},V={V}"
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2.0).to(dev, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    g_lp = torch.randn(N, generator=g).to(dev)
    g_ent = torch.randn(N, generator=g).to(dev)
    nbytes = N * V * logits.element_size()
    copy_bw = measure_copy_bandwidth(min(1 << 30, 2 * nbytes), device=dev)
    print(f"(a) logprob_entropy {shape} fp32 on {dev}; copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    record(env, op="copy_bandwidth", provider="torch.copy_", shape="1 GiB", dtype="fp32",
           bytes_per_s=copy_bw, note="read+write bytes / s; floor for (a)")

    def ref(x, t):
        return logprob_entropy_ref(x, t)

    compiled = torch.compile(ref, dynamic=False)
    # eager first: every later row carries its speed-up over it
    providers = {"torch_eager": ref, "axpo": lambda x, t: logprob_entropy(x, t), "torch_compile": compiled}
    if dev.type == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            ce = LigerCrossEntropyLoss(reduction="none")
            providers["liger_ce(no entropy)"] = lambda x, t: (-ce(x, t), None)
        except Exception as e:  # pragma: no cover
            print("  liger CE unavailable:", e)

    # correctness guard: the numbers below are only worth printing if the outputs agree
    with torch.no_grad():
        a_lp, a_ent = logprob_entropy(logits, targets)
        r_lp, r_ent = ref(logits, targets)
    err = max((a_lp - r_lp).abs().max().item(), (a_ent - r_ent).abs().max().item())
    print(f"  max |axpo - eager| over logp and entropy: {err:.2e}", flush=True)

    results = {}
    for mode in ("fwd", "fwd+bwd"):
        moved = nbytes if mode == "fwd" else 3 * nbytes  # fwd: read; bwd: read + write dlogits
        for name, fn in providers.items():
            slow = name == "torch_eager" or name.startswith("torch_compile")
            reps = 3 if (slow or mode == "fwd+bwd") else 5
            if quick:
                reps = 2
            if mode == "fwd":
                def run(_, fn=fn):
                    with torch.no_grad():
                        fn(logits, targets)
            else:
                def run(x, fn=fn):
                    lp, ent = fn(x, targets)
                    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
                    loss.backward()

            t_compile = time.perf_counter()
            try:
                t = time_fn(run, warmup=1, repeats=reps, device=dev, memory=True,
                            setup=lambda: logits.detach().requires_grad_(mode != "fwd"))
            except Exception as e:  # e.g. torch.compile without a working compiler
                skipped(env, "logprob_entropy", name, shape, "fp32", f"{type(e).__name__}: {e}"[:300], mode=mode)
                continue
            wall = time.perf_counter() - t_compile
            results[(mode, name)] = t
            eager = results.get((mode, "torch_eager"))
            record(env, op="logprob_entropy", provider=name, mode=mode, shape=shape, dtype="fp32",
                   **t, gbps=moved / t["median_s"] / 1e9, frac_of_copy_bw=moved / t["median_s"] / copy_bw,
                   speedup_vs_eager=eager["median_s"] / t["median_s"] if eager else None,
                   wall_incl_warmup_s=wall)
            print(f"  {mode:8s} {name:22s} {t['median_s'] * 1e3:9.1f} ms  peak +{t['peak_bytes'] / 2**20:8.0f} MiB",
                  flush=True)
    if dev.type != "cuda":
        for mode in ("fwd", "fwd+bwd"):
            skipped(env, "logprob_entropy", "liger", shape, "fp32",
                    "Liger's cross-entropy kernels are Triton-only (need a GPU); no entropy output either",
                    mode=mode)
    return results


# --------------------------------------------------------------------------------------------
# (b) fused LM head + clipped policy loss
# --------------------------------------------------------------------------------------------


def _interleaved(providers, floor, setup, reps, dev, clock="wall"):
    """Rounds of (floor, each provider): per provider (timing dict, per-round ratios); floor timing.

    clock="cpu" times with the process CPU time (time.process_time) instead of wall time: on a
    machine shared with other jobs it counts what this process executed, not the time it waited
    for a core. It is meaningful with one torch thread (with more, it adds up the threads and
    their spin-waits), and rows say which clock was used."""
    import statistics

    from common import _percentile, _sync

    now = time.process_time if clock == "cpu" else time.perf_counter

    def one(fn, memory):
        arg = setup()
        probe = _MemoryProbe(dev) if memory else None
        _sync(dev)
        if probe:
            probe.start()
        t0 = now()
        fn(arg)
        _sync(dev)
        dt = now() - t0
        peak = probe.stop() if probe else None
        del arg
        return dt, peak, (probe.method if probe else None)

    ft, times = [], {n: [] for n in providers}
    peaks, method = {n: [] for n in providers}, None
    for _ in range(reps):
        t0 = now()
        floor()
        _sync(dev)
        ft.append(now() - t0)
        for name, fn in providers.items():
            dt, pk, method = one(fn, True)
            times[name].append(dt)
            peaks[name].append(pk)
        print(f"    round {len(ft)}/{reps}: floor {ft[-1]:.2f} s, "
              + ", ".join(f"{n} {times[n][-1]:.2f} s (x{times[n][-1] / ft[-1]:.3f})" for n in providers)
              + f"  [{clock} clock, load {_loadavg()}]", flush=True)

    def summary(xs):
        return {"median_s": statistics.median(xs), "p20_s": _percentile(xs, 0.2), "p80_s": _percentile(xs, 0.8),
                "repeats": len(xs), "times_s": xs}

    out = {}
    for name in providers:
        t = summary(times[name])
        t.update(peak_bytes=max(peaks[name]), mem_method=method,
                 paired_ratios=[a / b for a, b in zip(times[name], ft)])
        t["ratio_paired_median"] = statistics.median(t["paired_ratios"])
        out[name] = t
    return out, summary(ft)


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return None


def case_b(env, dev, B, T, H, V, quick, only=None, reps_override=None, interleave=False, clock="wall"):
    dtype = torch.float32
    N = B * T
    shape = f"N={N}({B}x{T}),H={H},V={V}"
    g = torch.Generator(device="cpu").manual_seed(1)
    X = (torch.randn(B, T, H, generator=g) * 0.5).to(dev, dtype)
    W = (torch.randn(V, H, generator=g) * 0.02).to(dev, dtype)
    y = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = (torch.rand(B, T, generator=g) > 0.1).to(dev)
    adv = torch.randn(B, generator=g).to(dev)
    with torch.no_grad():  # old / ref log-probs near the current ones, as in a real step
        lp0, _ = linear_logprob_entropy(X, W, y, return_entropy=False)
    old = (lp0 + 0.05 * torch.randn(B, T, generator=g).to(dev)).detach()
    ref = (lp0 + 0.05 * torch.randn(B, T, generator=g).to(dev)).detach()
    beta = 0.04
    flops_useful = 6 * N * H * V  # logits + dX + dW
    print(f"(b) linear_logprob_entropy + clipped_policy_loss fwd+bwd {shape} fp32 on {dev}", flush=True)

    def leaves():
        return X.detach().requires_grad_(), W.detach().requires_grad_()

    def axpo(args):
        x, w = args
        lp, ent = linear_logprob_entropy(x, w, y)  # entropy is computed (for logging), not in the loss
        loss, _ = clipped_policy_loss(lp, old, adv, mask, ref_logp=ref, beta=beta)
        loss.backward()
        return loss

    def axpo_fused(args):
        x, w = args
        loss, _ = linear_policy_loss(x, w, y, old, adv, mask, ref_logp=ref, beta=beta)  # entropy in stats
        loss.backward()
        return loss

    def eager(args):
        x, w = args
        lp, ent = linear_logprob_entropy_ref(x, w, y)
        loss, _ = clipped_policy_loss_ref(lp, old, adv, mask, ref_logp=ref, beta=beta)
        loss.backward()
        return loss

    compiled_fwd = torch.compile(
        lambda x, w: clipped_policy_loss_ref(linear_logprob_entropy_ref(x, w, y)[0], old, adv, mask,
                                             ref_logp=ref, beta=beta)[0], dynamic=False)

    def compiled(args):
        x, w = args
        loss = compiled_fwd(x, w)
        loss.backward()
        return loss

    providers = {"axpo_fused": (axpo_fused, 1, 3), "axpo": (axpo, 1, 3), "liger_grpo": None,
                 "torch_eager": (eager, 0, 1), "torch_compile": (compiled, 1, 1)}
    if only:
        unknown = set(only) - set(providers)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {sorted(providers)}")
        providers = {k: v for k, v in providers.items() if k in only}
    try:
        if "liger_grpo" not in providers:
            raise LookupError("not selected")
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger_mod = LigerFusedLinearGRPOLoss(beta=beta, loss_type="dapo", use_ref_model=True, compiled=True)

        def liger(args):
            x, w = args
            loss, _ = liger_mod(x, w, y, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss.backward()
            return loss

        providers["liger_grpo"] = (liger, 1, 3)
    except LookupError:
        pass
    except Exception as e:
        providers.pop("liger_grpo")
        skipped(env, "linear_logprob_entropy+clipped_policy_loss", "liger_grpo", shape, "fp32", repr(e))

    # correctness guard: same loss and gradients from axpo_fused, axpo and Liger
    xa, wa = leaves()
    la = axpo_fused((xa, wa))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    for other in ("axpo", "liger_grpo"):
        if other in providers:
            xl, wl = leaves()
            ll = providers[other][0]((xl, wl))
            print(f"  loss axpo_fused {la.item():.6f} {other} {ll.item():.6f}; rel. grad diff "
                  f"dX {rel(xa.grad, xl.grad):.1e} dW {rel(wa.grad, wl.grad):.1e}", flush=True)
            del xl, wl, ll
    del xa, wa, la

    # the floor: the three GEMMs alone, outputs preallocated (freed before the providers run)
    Xf = X.reshape(N, H)
    buf = {"L": torch.empty(N, V, device=dev, dtype=dtype), "dX": torch.empty(N, H, device=dev, dtype=dtype),
           "dW": torch.empty(V, H, device=dev, dtype=dtype)}

    def floor():
        torch.mm(Xf, W.t(), out=buf["L"])
        torch.mm(buf["L"], W, out=buf["dX"])
        torch.mm(buf["L"].t(), Xf, out=buf["dW"])

    op = "linear_logprob_entropy+clipped_policy_loss"
    if interleave:
        reps = reps_override or (1 if quick else 3)
        floor()  # warm-up, then each provider's own warm-up
        for name, (fn, warm, _) in providers.items():
            for _ in range(max(1, warm)):
                fn(leaves())
        res, tf = _interleaved({n: spec[0] for n, spec in providers.items()}, floor, leaves, reps, dev, clock)
        buf.clear()
        record(env, op=op, provider="gemm_floor(3 GEMMs)", mode="fwd+bwd", shape=shape, dtype="fp32", **tf,
               tflops=flops_useful / tf["median_s"] / 1e12, ratio_to_gemm_floor=1.0, interleaved=True, clock=clock,
               loadavg_after=_loadavg())
        print(f"  fwd+bwd  {'gemm_floor(3 GEMMs)':22s} {tf['median_s']:9.2f} s  "
              f"({flops_useful / tf['median_s'] / 1e9:.0f} GFLOP/s)  rounds {[round(x, 2) for x in tf['times_s']]}",
              flush=True)
        for name, t in res.items():
            record(env, op=op, provider=name, mode="fwd+bwd", shape=shape, dtype="fp32", **t,
                   tflops=flops_useful / t["median_s"] / 1e12, ratio_to_gemm_floor=t["median_s"] / tf["median_s"],
                   interleaved=True, clock=clock, loadavg_after=_loadavg())
            print(f"  fwd+bwd  {name:22s} {t['median_s']:9.2f} s  peak +{t['peak_bytes'] / 2**20:8.0f} MiB  "
                  f"x{t['median_s'] / tf['median_s']:.2f} floor (median of per-round ratios "
                  f"x{t['ratio_paired_median']:.2f}; rounds {[round(x, 2) for x in t['times_s']]})", flush=True)
        return {"floor": tf, **res}

    reps = reps_override or (2 if quick else 3)
    tf = time_fn(floor, warmup=1, repeats=reps, device=dev)
    buf.clear()
    record(env, op=op, provider="gemm_floor(3 GEMMs)", mode="fwd+bwd",
           shape=shape, dtype="fp32", **tf, tflops=flops_useful / tf["median_s"] / 1e12, ratio_to_gemm_floor=1.0)
    rate = flops_useful / tf["median_s"] / 1e9
    print(f"  fwd+bwd  {'gemm_floor(3 GEMMs)':22s} {tf['median_s']:9.2f} s  ({rate:.0f} GFLOP/s)", flush=True)

    results = {"floor": tf}
    for name, spec in providers.items():
        fn, warm, reps = spec
        if quick:
            warm, reps = 1, 1
        if reps_override:
            reps = reps_override
        t0 = time.perf_counter()
        try:
            t = time_fn(fn, warmup=warm, repeats=reps, device=dev, setup=leaves, memory=True)
        except Exception as e:
            skipped(env, "linear_logprob_entropy+clipped_policy_loss", name, shape, "fp32",
                    f"{type(e).__name__}: {e}"[:300], mode="fwd+bwd")
            continue
        wall = time.perf_counter() - t0
        results[name] = t
        record(env, op="linear_logprob_entropy+clipped_policy_loss", provider=name, mode="fwd+bwd", shape=shape,
               dtype="fp32", **t, tflops=flops_useful / t["median_s"] / 1e12,
               ratio_to_gemm_floor=t["median_s"] / tf["median_s"], wall_incl_warmup_s=wall)
        print(f"  fwd+bwd  {name:22s} {t['median_s']:9.2f} s  peak +{t['peak_bytes'] / 2**20:8.0f} MiB  "
              f"x{t['median_s'] / tf['median_s']:.2f} floor", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--cases", default="a,b")
    ap.add_argument("--providers", default="", help="case (b) providers, comma-separated (default: all)")
    ap.add_argument("--reps", type=int, default=0, help="case (b) timed repeats per provider (default 3, eager 1)")
    ap.add_argument("--interleave", action="store_true",
                    help="case (b): floor and providers in rounds (for a shared, noisy machine)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="with --interleave: wall time, or process CPU time (shared machine, 1 thread)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = env_info(dev)
    env["run"] = timestamp()
    env["quick"] = args.quick
    t_start = time.perf_counter()
    res_a = res_b = None
    if "a" in args.cases:
        res_a = case_a(env, dev, *((64, 4099) if args.quick else (2048, 151936)), args.quick)
    if "b" in args.cases:
        only = [p for p in args.providers.split(",") if p] or None
        res_b = case_b(env, dev, *((2, 32, 64, 4099) if args.quick else (8, 512, 1024, 151936)), args.quick,
                       only=only, reps_override=args.reps or None, interleave=args.interleave, clock=args.clock)

    run_rows = [r for r in ROWS if r.get("op") != "copy_bandwidth"]
    cols = [("op", "op", None), ("provider", "provider", None), ("mode", "mode", None),
            ("median_s", "median s", "{:.4f}"), ("p20_s", "p20", "{:.4f}"), ("p80_s", "p80", "{:.4f}"),
            ("repeats", "n", None), ("peak_bytes", "peak +MiB", None), ("gbps", "GB/s", "{:.1f}"),
            ("frac_of_copy_bw", "of copy", "{:.2f}"), ("speedup_vs_eager", "vs eager", "{:.2f}x"),
            ("ratio_to_gemm_floor", "/ GEMM floor", "{:.2f}")]
    table_rows = []
    for r in run_rows:
        r2 = dict(r)
        r2["op"] = {"logprob_entropy": "(a) logprob_entropy",
                    "linear_logprob_entropy+clipped_policy_loss": "(b) head+loss"}.get(r["op"], r["op"])
        if r2.get("peak_bytes") is not None:
            r2["peak_bytes"] = f"{r2['peak_bytes'] / 2**20:.0f}"
        if r2.get("skipped"):
            r2["median_s"] = None
            r2["mode"] = (r2.get("mode") or "") + " (skipped)"
        table_rows.append(r2)
    print()
    print(format_table(table_rows, cols))
    print(f"\ndevice {env['device']} ({env['cpu']}, {env['torch_threads']} threads); torch {env['torch']}, "
          f"triton {env['triton']}, liger {env['liger_kernel']}; memory: {ROWS[-1].get('mem_method') or ''}")
    if res_a and ("fwd+bwd", "axpo") in res_a and ("fwd+bwd", "torch_eager") in res_a:
        s = res_a[("fwd+bwd", "torch_eager")]["median_s"] / res_a[("fwd+bwd", "axpo")]["median_s"]
        print(f"target (a): fwd+bwd {s:.2f}x faster than eager (>= 3x: {'met' if s >= 3 else 'NOT met'})")
    for name in ("axpo_fused", "axpo"):
        if not (res_b and name in res_b):
            continue
        a = res_b[name]
        floor_x = a["median_s"] / res_b["floor"]["median_s"]
        line = f"target (b, issue #14) {name}: x{floor_x:.2f} of the GEMM floor (<= 1.15: {'met' if floor_x <= 1.15 else 'NOT met'})"
        if "liger_grpo" in res_b:
            lg = res_b["liger_grpo"]
            mem = a["peak_bytes"] / max(1, lg["peak_bytes"])
            line += (f"; peak +{a['peak_bytes'] / 2**20:.0f} vs Liger +{lg['peak_bytes'] / 2**20:.0f} MiB = {mem:.2f}x "
                     f"(<= 0.6: {'met' if mem <= 0.6 else 'NOT met'}); time vs Liger {a['median_s'] / lg['median_s']:.2f}x")
        print(line)
    print(f"rows appended to {OUT}; wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
