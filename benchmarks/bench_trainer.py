"""One RL step, AXPO's trainer vs TRL's GRPOTrainer, on identical work (issue #14).

    python benchmarks/bench_trainer.py                 # GRPO + AXPO mode vs TRL, 6 alternating steps each
    python benchmarks/bench_trainer.py --steps 3       # shorter
    python benchmarks/bench_trainer.py --prompt raw    # plain-text prompts (no chat template) on both sides
    python benchmarks/bench_trainer.py --profile       # cProfile of AXPO GRPO steps (top entries), no TRL

Work: the tiny random-init Qwen3-VL (`TinyModelConfig(vocab_size=512)`: 4 layers, hidden 128, the
same seed-0 weights on both sides), 64 arithmetic prompts, 8 prompts x 8 completions of at most 64
tokens per step (temperature 1, stop at <|im_end|>), GRPO with beta 0, clip 0.2/0.28, token-mean
loss (TRL's "dapo"), 1 epoch (TRL num_iterations=1), AdamW lr 1e-5, grad clip 1, one micro-batch,
one process with 2 torch threads per framework. The prompt is the user turn through the model's
chat template with the generation prompt (both sides render the same text), or with `--prompt raw`
the bare question. Reward (both sides, on the decoded completion): 1 if it contains the answer,
plus a small hash of the text so groups have reward variance and advantages are not all zero
(a random-init model never answers).

AXPO runs the real `Trainer.rl` step (rollout through the agent loop and the built-in engine,
`expand`, advantages, `policy_update`, engine weight sync) with one turn per rollout and no tool
schema in the prompt; AXPO mode (`algo.axpo=true`) also allows a second turn so AXPO can branch
from failed tool calls. Each framework lives in its own worker process (its own peak RSS); the
parent alternates them step by step (TRL step i, AXPO step i, AXPO-mode step i, ...), so machine
noise hits both alike. Reported: medians over steps 2..N (step 1 is warm-up) of step, generation
and update time (update = step - generation), wall clock and the worker's CPU time (on a machine
shared with other jobs, CPU time at 1 thread is the steadier measure of work), generated tokens
per step, each worker's peak RSS (VmHWM, whole process) and the per-step ratios AXPO / TRL. With
`--root-b DIR`, modes grpo_b / axpo_b run the trainer of another checkout (e.g. the engine before
a change) in the same alternation. Rows go to benchmarks/results/bench_trainer.jsonl.

TRL is optional (`pip install trl`); without it only the AXPO rows are measured, and the script
says so.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OUT_NAME = "bench_trainer.jsonl"
PROMPTS, PER_STEP, G, NEW_TOKENS, LR = 64, 8, 8, 64, 1e-5


def arithmetic(n: int = PROMPTS, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        op = rng.choice("+-*")
        ans = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append((f"What is {a} {op} {b}?", str(ans)))
    return out


def reward_text(text: str, answer: str) -> float:
    return float(answer in text) + (zlib.crc32(text.encode()) % 1000) / 10000.0


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    warnings.filterwarnings("ignore")


# -- AXPO worker --------------------------------------------------------------------------------

def _axpo_trainer(axpo_mode: bool, prompt: str, out_dir: str, steps: int):
    from axpo.config import Config
    from axpo.models import TinyModelConfig
    from axpo.tasks.base import Sample
    from axpo.trainer import Trainer

    cfg = Config()
    cfg.model.name = "tiny"
    cfg.model.tiny = TinyModelConfig(vocab_size=512)
    cfg.model.tiny_base = "random"   # the work: a random-init model
    r = cfg.rollout
    r.group_size, r.temperature, r.top_p, r.top_k = G, 1.0, 1.0, 0
    r.max_turn_tokens, r.max_turns, r.max_total_tokens = NEW_TOKENS, (2 if axpo_mode else 1), 4096
    r.mask_truncated = False
    a = cfg.algo
    a.axpo, a.brute_force, a.beta, a.clip_low, a.clip_high = axpo_mode, False, 0.0, 0.2, 0.28
    a.loss_agg, a.ppo_epochs, a.advantage = "token-mean", 1, "grpo"
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.grad_clip = LR, 0.0, 1, 1.0
    cfg.optim.betas = (0.9, 0.999)
    cfg.rl.lr, cfg.rl.questions_per_step, cfg.rl.micro_batch_tokens = LR, PER_STEP, 1 << 16
    cfg.rl.steps, cfg.rl.checkpoint_every = steps, 0
    t = cfg.trainer
    t.output_dir, t.checkpoint_every, t.evaluate, t.tensorboard, t.plots = out_dir, 0, False, False, False
    cfg.pretrain.steps, cfg.sft.steps = 0, 0
    cfg.data.tasks = ["calculation"]
    tr = Trainer(cfg)
    qa = arithmetic()
    samples = [Sample(uid=f"q{i}", task="arith", question=q, images=[], answer=ans, answer_type="exact")
               for i, (q, ans) in enumerate(qa)]
    answers = {s.uid: s.answer for s in samples}
    tr.src.train = samples
    tr.src.reward = lambda traj, split="train": reward_text(traj.final_text or "", answers[traj.sample_uid])
    tr.loop._schemas = lambda sample: []                       # no tool schema in the prompt
    if prompt == "raw":
        fmt = tr.fmt
        fmt.prompt = lambda question, images, tools, system=None: fmt.encode(question, images)
    captured = {}
    log = tr.log.log
    # CPU time of generation (base rollouts + AXPO's expand), next to the trainer's wall rollout_time.
    import axpo.trainer as trainer_mod

    def cpu_timed(fn):
        def wrapper(*a, **k):
            c = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                captured["gen_cpu"] = captured.get("gen_cpu", 0.0) + time.process_time() - c
        return wrapper

    tr.loop.rollout = cpu_timed(tr.loop.rollout)
    trainer_mod.expand = cpu_timed(trainer_mod.expand)

    def capture(stage, step, metrics):
        captured.update(metrics)
        return log(stage, step, metrics)

    tr.log.log = capture
    tr._checkpoint = lambda *a, **k: None    # no checkpoint saving in a timed step (TRL: save_strategy="no")
    tr._make_optimizer(cfg.rl)
    tr.sync_engine()
    return tr, captured


def axpo_worker(conn, axpo_mode: bool, prompt: str, steps: int, threads: int, root: str | None = None):
    try:
        sys.stderr = open(os.devnull, "w")        # the trainer's progress bars; errors go through the pipe
        if root:                                  # another checkout's axpo (e.g. the engine before a change)
            sys.path.insert(0, root)
            for m in [m for m in sys.modules if m == "axpo" or m.startswith("axpo.")]:
                del sys.modules[m]
        _threads(threads)
        with tempfile.TemporaryDirectory() as d:
            tr, captured = _axpo_trainer(axpo_mode, prompt, d, steps)
            conn.send(("ready", _peak_rss_bytes()))
            for step in range(steps):
                if conn.recv() != "go":
                    break
                captured.clear()
                tr.cfg.rl.steps = step + 1                     # rl(start) runs steps [start, rl.steps)
                t0, c0 = time.perf_counter(), time.process_time()
                tr.rl(step)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                import axpo

                conn.send(("step", dict(step_s=dt, gen_s=captured["rollout_time"], upd_s=dt - captured["rollout_time"],
                                        step_cpu_s=dc, gen_cpu_s=captured["gen_cpu"], upd_cpu_s=dc - captured["gen_cpu"],
                                        root=os.path.dirname(os.path.dirname(axpo.__file__)),
                                        tokens=captured["rollout_tokens"], extra=captured.get("extra_rollouts", 0),
                                        peak_rss=_peak_rss_bytes())))
    except Exception:
        conn.send(("error", traceback.format_exc()))


# -- TRL worker ---------------------------------------------------------------------------------

def trl_worker(conn, prompt: str, steps: int, threads: int):
    try:
        _threads(threads)
        import torch
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from axpo.models import TinyModelConfig, build_tiny_model, build_tiny_processor

        cfg = TinyModelConfig(vocab_size=512)
        proc = build_tiny_processor(cfg)
        tok = proc.tokenizer
        model = build_tiny_model(0, cfg, proc)
        model.generation_config.pad_token_id = tok.pad_token_id
        qa = arithmetic()
        rows = [{"prompt": ([{"role": "user", "content": q}] if prompt == "chat" else q), "answer": a}
                for q, a in qa]
        ds = Dataset.from_list(rows)

        def reward(completions, answer, **kw):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [reward_text(t, a) for t, a in zip(texts, answer)]

        state = {"gen": 0.0, "gen_cpu": 0.0, "tokens": 0}

        class Timed(GRPOTrainer):
            def _generate(self, prompts):
                t0, c0 = time.perf_counter(), time.process_time()
                out = super()._generate(prompts)
                state["gen"] += time.perf_counter() - t0
                state["gen_cpu"] += time.process_time() - c0
                state["tokens"] += sum(len(c) for c in out[1])
                return out

        class Step(TrainerCallback):
            def on_step_begin(self, args, st, control, **kw):
                if conn.recv() != "go":
                    raise SystemExit(0)
                state.update(gen=0.0, gen_cpu=0.0, tokens=0, t0=time.perf_counter(), c0=time.process_time())

            def on_step_end(self, args, st, control, **kw):
                dt, dc = time.perf_counter() - state["t0"], time.process_time() - state["c0"]
                conn.send(("step", dict(step_s=dt, gen_s=state["gen"], upd_s=dt - state["gen"], step_cpu_s=dc,
                                        gen_cpu_s=state["gen_cpu"], upd_cpu_s=dc - state["gen_cpu"],
                                        tokens=state["tokens"], extra=0, peak_rss=_peak_rss_bytes())))

        with tempfile.TemporaryDirectory() as d:
            args = GRPOConfig(
                output_dir=d, per_device_train_batch_size=PER_STEP * G, gradient_accumulation_steps=1,
                num_generations=G, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
                beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_iterations=1,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                dataloader_num_workers=0, seed=0, disable_tqdm=True, log_completions=False)
            trainer = Timed(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                            callbacks=[Step()])
            conn.send(("ready", _peak_rss_bytes()))
            trainer.train()
    except SystemExit:
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))


# -- parent -------------------------------------------------------------------------------------

def _start(ctx, target, *args):
    a, b = ctx.Pipe()
    p = ctx.Process(target=target, args=(b, *args), daemon=True)
    p.start()
    msg = a.recv()
    if msg[0] == "error":
        p.join()
        raise RuntimeError(msg[1])
    return p, a


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def profile(args):
    import cProfile
    import pstats

    _threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tr, captured = _axpo_trainer(args.axpo_mode, args.prompt, d, args.steps)
        tr.cfg.rl.steps = 1
        tr.rl(0)                                              # warm-up
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for s in range(1, args.steps):
            tr.cfg.rl.steps = s + 1
            tr.rl(s)
        pr.disable()
        n = args.steps - 1
        print(f"AXPO {'axpo' if args.axpo_mode else 'grpo'} mode, {n} profiled steps, "
              f"{(time.perf_counter() - t0) / n:.3f} s/step under cProfile (cProfile adds overhead)")
        st = pstats.Stats(pr)
        st.sort_stats("cumulative").print_stats(45)
        st.sort_stats("tottime").print_stats(25)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", choices=["chat", "raw"], default="chat")
    ap.add_argument("--modes", default="trl,grpo,axpo", help="comma list of trl, grpo, axpo (and grpo_b, axpo_b)")
    ap.add_argument("--root-b", default=None, help="checkout whose axpo the grpo_b/axpo_b workers run "
                    "(e.g. a worktree with the previous engine), for an A/B of two versions in one invocation")
    ap.add_argument("--profile", action="store_true", help="cProfile AXPO steps in-process (no TRL)")
    ap.add_argument("--axpo-mode", action="store_true", help="with --profile: algo.axpo=true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.profile:
        return profile(args)
    from common import RESULTS_DIR, append_row, env_info, format_table, timestamp

    modes = args.modes.split(",")
    if "trl" in modes:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install trl): measuring AXPO only, no TRL comparison", flush=True)
            modes.remove("trl")
    ctx = mp.get_context("spawn")
    workers = {}
    for m in modes:
        print(f"starting {m} worker ...", flush=True)
        if m == "trl":
            workers[m] = _start(ctx, trl_worker, args.prompt, args.steps, args.threads)
        else:
            root = args.root_b if m.endswith("_b") else None
            if m.endswith("_b") and not root:
                raise SystemExit(f"mode {m} needs --root-b")
            workers[m] = _start(ctx, axpo_worker, m.startswith("axpo"), args.prompt, args.steps, args.threads, root)
    res = {m: [] for m in modes}
    failed = {}
    for step in range(args.steps):
        for m in [m for m in modes if m not in failed]:   # alternate: every mode's step i before step i+1
            p, conn = workers[m]
            conn.send("go")
            try:
                msg = conn.recv()
            except EOFError:
                msg = ("error", f"worker exited (exit code {p.join(5) or p.exitcode})")
            if msg[0] == "error":
                failed[m] = msg[1]
                print(f"step {step + 1} {m}: worker FAILED, dropped from the comparison:\n{msg[1]}", flush=True)
                continue
            res[m].append(msg[1])
            r = msg[1]
            print(f"step {step + 1} {m:6s} {r['step_s']:.3f} s (gen {r['gen_s']:.3f}, upd {r['upd_s']:.3f}; CPU "
                  f"{r['step_cpu_s']:.3f} s, gen {r['gen_cpu_s']:.3f}), {r['tokens']} tokens", flush=True)
    for p, conn in workers.values():
        try:
            conn.send("stop")
        except OSError:
            pass
        p.join(timeout=30)
    env = dict(env_info(), threads_per_worker=args.threads)
    rows = []
    ref = res.get("trl")
    names = {"trl": "trl_grpo", "grpo": "axpo_trainer_grpo", "axpo": "axpo_trainer_axpo_mode",
             "grpo_b": "axpo_trainer_grpo_root_b", "axpo_b": "axpo_trainer_axpo_mode_root_b"}
    for m in modes:
        if not res[m]:
            continue
        xs = res[m][1:] if len(res[m]) > 1 else res[m]
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(res[m][1:], ref[1:])] if ref and m != "trl" else []
        if m in failed:
            print(f"note: {m} failed after {len(res[m])} steps; its row covers those steps only")
        row = dict(bench="trainer_step", method=names[m], prompt=args.prompt, steps=args.steps,
                   median_step_s=_median([x["step_s"] for x in xs]), median_gen_s=_median([x["gen_s"] for x in xs]),
                   median_upd_s=_median([x["upd_s"] for x in xs]), median_tokens=_median([x["tokens"] for x in xs]),
                   median_step_cpu_s=_median([x["step_cpu_s"] for x in xs]),
                   median_gen_cpu_s=_median([x["gen_cpu_s"] for x in xs]),
                   median_upd_cpu_s=_median([x["upd_cpu_s"] for x in xs]),
                   cpu_ratio_vs_trl_per_pair=[round(a["step_cpu_s"] / b["step_cpu_s"], 3)
                                              for a, b in zip(res[m][1:], ref[1:])] if ref and m != "trl" else [],
                   gen_us_per_token=1e6 * _median([x["gen_s"] / max(1, x["tokens"]) for x in xs]),
                   extra_rollouts=_median([x["extra"] for x in xs]),
                   peak_rss_gib=max(x["peak_rss"] for x in res[m]) / 2**30,
                   ratio_vs_trl_per_pair=[round(r, 3) for r in ratios], median_ratio_vs_trl=_median(ratios) if ratios else None,
                   step_s_all=[round(x["step_s"], 4) for x in res[m]], prompts_per_step=PER_STEP, group_size=G,
                   max_new_tokens=NEW_TOKENS, model="tiny qwen3vl vocab 512", axpo_root=res[m][0].get("root"),
                   failed=failed.get(m, "").strip().splitlines()[-1:] or None,
                   **env, timestamp=timestamp())
        row["cpu_ratio"] = _median(row["cpu_ratio_vs_trl_per_pair"]) if row["cpu_ratio_vs_trl_per_pair"] else None
        rows.append(row)
        if not args.no_save:
            append_row(os.path.join(RESULTS_DIR, OUT_NAME), row)
    print()
    print(format_table(rows, [("method", "method", None), ("median_step_s", "step s", "{:.3f}"),
                              ("median_gen_s", "gen s", "{:.3f}"), ("median_upd_s", "update s", "{:.3f}"),
                              ("median_tokens", "tokens", "{:.0f}"), ("gen_us_per_token", "gen us/tok", "{:.0f}"),
                              ("peak_rss_gib", "peak RSS GiB", "{:.2f}"), ("median_ratio_vs_trl", "x TRL", "{:.2f}"),
                              ("median_step_cpu_s", "step CPU s", "{:.3f}"), ("median_gen_cpu_s", "gen CPU s", "{:.3f}"),
                              ("median_upd_cpu_s", "upd CPU s", "{:.3f}"), ("cpu_ratio", "x TRL CPU", "{:.2f}")]))
    for r in rows:
        if r["ratio_vs_trl_per_pair"]:
            print(f"{r['method']}: per-pair step ratio vs TRL, wall {r['ratio_vs_trl_per_pair']}, "
                  f"CPU time {r['cpu_ratio_vs_trl_per_pair']}")
    print(f"\nmedians of steps 2..{args.steps}; {args.threads} threads per worker; {env['cpu']} x{env['cpu_count']}, "
          f"torch {env['torch']}")


if __name__ == "__main__":
    main()
