"""The run: copy pre-training -> SFT on demonstrations -> evaluation -> RL (AXPO or GRPO) -> evaluation -> export.

Each rank holds an FSDP2 shard of the policy for training and a full copy inside its rollout
engine; after every optimiser step the engine receives the gathered weights, bucket by bucket
(`sync_bucket_bytes`), copied in place. Loading: rank 0 alone reads the weights; the other ranks
build the model on the meta device and receive their shards (axpo/models.py). Each rank rolls out
its share of the step's questions (whole groups, so AXPO's trigger and budget are rank-local).

Determinism: the questions of a step, the demonstrations of an SFT step and every sampling seed are
functions of (seed, stage, step, question), so a resumed run replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from axpo import distributed
from axpo.agent.format import AgentFormat
from axpo.agent.loop import AgentLoop
from axpo.algo.credit import assign
from axpo.algo.resample import expand, reduce_diagnostics
from axpo.checkpoint import (SYNC_BUCKET_BYTES, Checkpointer, check_checkpoint_path, copy_gathered_weights,
                             copy_local_weights, export_hf, load_weights)
from axpo.config import Config, StageConfig, load_config, to_dict
from axpo.eval import evaluate
from axpo.metrics import MetricsLogger, plot_run, write_summary
from axpo.models import load_full_weights, load_on_rank0, materialize, release_storage, restore_storage
from axpo.policy import PolicyModel
from axpo.pretrain import CopySequences, copy_accuracy
from axpo.rollout.engine import Engine
from axpo.rollout_stats import RolloutCounts
from axpo.rows import TrainingRow
from axpo.sft import encode_demo
from axpo.sources import build_sources
from axpo.update import policy_update, supervised_update

PRETRAIN_EVAL_EVERY = 250  # pre-training steps between held-out copy-accuracy measurements
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_for_checkpoint(checkpoint: str, config: str | None, overrides: list[str]) -> Config:
    """The config a checkpoint was trained with (run_dir/config.yaml), unless one is given."""
    check_checkpoint_path(checkpoint)
    if config is None:
        ck = Path(checkpoint)
        # run/checkpoints/step_x (DCP) or run/hf (Hugging Face export)
        for p in (ck.parent.parent / "config.yaml", ck.parent / "config.yaml"):
            if p.exists():
                config = str(p)
                break
    return load_config(config, overrides)


def _permuted(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


def take(n_items: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of step `step` (0-based) in a stream of per-epoch permutations: deterministic and
    position-only, so resuming needs nothing but the step number."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_items)
        out.append(_permuted(n_items, seed, epoch)[pos])
    return out


class Trainer:
    def __init__(self, cfg: Config, *, for_eval: bool = False, tools: list | None = None, reward=None):
        """`tools`: Tool objects offered besides `tools.enabled`; `reward`: a function, RewardFn or
        registered name instead of `data.reward` (both passed to `build_sources`)."""
        self.cfg = cfg
        self.d = distributed.init()
        self.run_dir = Path(cfg.trainer.output_dir)
        self.ckpt = Checkpointer(self.run_dir, self.d, keep_last=cfg.trainer.keep_last)
        # --resume: from where is settled before anything is built; no checkpoint is an error.
        self.resume_from = self.ckpt.resume_point() if cfg.trainer.resume and not for_eval else None
        if self.resume_from is not None and self.resume_from[2] is not None and self.d.main:
            print(self.resume_from[2], flush=True)
        self._skipped_in_a_row = 0
        torch.manual_seed(cfg.trainer.seed + self.d.rank)
        random.seed(cfg.trainer.seed + self.d.rank)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        dtype = DTYPES[cfg.model.dtype]
        self._dtype = dtype
        # Rank 0 alone reads the weights (one full CPU copy); every rank builds the architecture
        # on the meta device, shards it and allocates only its shards, which rank 0 fills.
        full, skeleton, self.processor = load_on_rank0(
            cfg.model.name, self.d, seed=cfg.trainer.seed, tiny=cfg.model.tiny, dtype=dtype,
            attn_implementation=None if cfg.model.name == "tiny" else cfg.model.attn_implementation,
            tiny_base=cfg.model.tiny_base)
        self._skeleton = copy.deepcopy(skeleton)   # meta, unwrapped: the reference policy is built from it
        self.fmt = AgentFormat(self.processor)
        self.src = build_sources(cfg, self.fmt, tools=tools, reward=reward)
        # The engine decodes with its own full copy of the weights: rank 0's loaded model; the
        # other ranks' copies are allocated from the skeleton and filled by the first sync.
        engine_model = full if full is not None else copy.deepcopy(skeleton)
        if full is not None:
            full.to(self.d.device)   # broadcast from device tensors (no host copy per tensor)
        if cfg.model.freeze_vision:
            skeleton.model.visual.requires_grad_(False)
        self.policy = distributed.shard(PolicyModel(skeleton, lean_activations=cfg.model.lean_activations), self.d,
                                        mixed_precision=dtype == torch.float32,
                                        activation_checkpointing=cfg.model.activation_checkpointing)
        materialize(self.policy, self.d.device)
        load_full_weights(self.policy, full, self.d)
        if full is None and (cfg.rollout.engine == "builtin" or cfg.pretrain.steps > 0):
            # (vLLM keeps its own copy, loaded from rank 0's folder: other ranks need none here)
            materialize(engine_model, self.d.device, buffers_from=self.policy)
        del full
        self.engine = self._build_engine(engine_model.eval())
        del engine_model
        self.loop = AgentLoop(self.engine, self.fmt, self.src.tools, cfg.rollout, seed=cfg.trainer.seed)
        if self.d.enabled:
            self.sync_engine()   # the other ranks' engine copies hold no weights yet
        self.log = MetricsLogger(self.run_dir, enabled=self.d.main and not for_eval,
                                 tensorboard=cfg.trainer.tensorboard, wandb=cfg.trainer.wandb and not for_eval,
                                 config=to_dict(cfg), resume=cfg.trainer.resume)
        if self.d.main and not for_eval:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.optimizer = None
        self.scheduler = None
        self._demo_cache: dict[int, object] = {}

    # -- building blocks --------------------------------------------------------------------

    def _make_optimizer(self, stage: StageConfig) -> None:
        o = self.cfg.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # No gradient may outlive a step: DCP initialises an empty optimiser state only when no
        # parameter holds a gradient, and save and load must see the same state.
        for p in params:
            p.grad = None
        self.optimizer = torch.optim.AdamW(params, lr=stage.lr or o.lr, betas=o.betas,
                                           weight_decay=o.weight_decay, foreach=False)
        warm = max(1, o.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))

    # Bytes per all-gather bucket of the engine sync and the export: the peak extra memory of both.
    sync_bucket_bytes = SYNC_BUCKET_BYTES

    _engine_released: list | None = None
    _engine_asleep = False

    def _build_engine(self, engine_model):
        """`rollout.engine`: the built-in engine over the engine copy, or vLLM (one in-process
        engine per rank, loaded from `model.name`, or for the tiny model from a folder rank 0
        writes from its copy; the config check has already said what to install if vLLM is
        missing)."""
        cfg, r = self.cfg, self.cfg.rollout
        if r.engine == "builtin":
            return Engine(engine_model, block_size=r.block_size, max_kv_tokens=r.max_kv_tokens, device=self.d.device)
        from axpo.rollout.vllm_engine import VLLMEngine

        on_gpu = self.d.device.type == "cuda"
        # A pretrained model: vLLM loads the very folder (or hub id) rank 0 read, instead of rank 0
        # writing its copy out again (17.5 GB for the 8B); the tiny model exists only in memory.
        source = engine_model if cfg.model.name == "tiny" else cfg.model.name
        engine = VLLMEngine(
            source, self.processor, dtype=cfg.model.dtype if r.vllm_dtype == "model" else r.vllm_dtype,
            # A prompt already past max_total_tokens still gets one token (the loop's max(1, ...)):
            # leave a turn of headroom.
            max_model_len=r.vllm_max_model_len or r.max_total_tokens + r.max_turn_tokens,
            # question image + per tool response at most 2 (a zoom crop: 1, python: max_figures 2)
            max_images=1 + 2 * r.max_turns,
            kv_cache_bytes=None if r.vllm_kv_cache_gib is None else int(r.vllm_kv_cache_gib * 2**30),
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            seed=cfg.trainer.seed + self.d.rank if r.vllm_seed is None else r.vllm_seed,
            # Sleep mode exists on CUDA/ROCm only (vLLM 0.32 CPU has none): asked for only there.
            **({"enable_sleep_mode": True} if on_gpu and r.release_weights_during_update else {}))
        if cfg.pretrain.steps > 0:
            # Copy pre-training measures its accuracy on `engine.model` (the tiny base only, small):
            # keep the HF copy as the sync's staging copy. Otherwise vLLM's copy is the only one.
            engine.model = engine_model
        return engine

    def _trainer_logps(self, trajs) -> list:
        """The policy's no-grad fused log-prob + entropy pass (`axpo.update.old_logprobs`) over
        `trajs` with the weights that rolled them out: (log-probs, entropies) per trajectory, index
        j = token j. Every rank takes part (FSDP: the same number of forwards on every rank)."""
        from axpo.update import old_logprobs

        rows = [{"tokens": t.tokens, "pixel_values": t.pixel_values, "grids": [s.grid_thw for s in t.image_spans]}
                for t in trajs]
        return old_logprobs(self.policy, rows, self.fmt, self.cfg.rl.micro_batch_tokens,
                            self.cfg.rollout.temperature, self.d)

    def _fill_entropies(self, base) -> dict:
        """Entropies for an engine that returns none (vLLM): AXPO's selection (and brute force's
        "axpo" plan) scores prefixes by the entropy before each cut, so the base rollouts get
        theirs from the policy's pass before `expand` (branches copy their parent's). Returns the
        pass's log-probs by trajectory uid, reused by truncated importance sampling."""
        lps, ents = self._trainer_logps(base)
        for t, e in zip(base, ents):
            t.entropies = e.tolist()
        return {t.uid: lp for t, lp in zip(base, lps)}

    def _tis(self, trajs, tok_adv, known: dict) -> tuple[list, dict]:
        """Truncated importance sampling (`rollout.tis_cap`): every token's advantage times
        min(exp(trainer logp - engine logp), cap), the trainer's log-probs from the pass before
        `expand` where it ran, else from one pass over the trajectories still missing them.
        Returns the scaled advantages and the mismatch's rank-summed statistics."""
        from axpo.rollout.vllm_engine import tis_weights

        missing = [t for t in trajs if t.uid not in known]
        if distributed.all_reduce_max(len(missing), self.d) > 0:
            lps, _ = self._trainer_logps(missing or trajs[:1])
            known = {**known, **{t.uid: lp for t, lp in zip(missing, lps)}}
        w, st = tis_weights(trajs, [known[t.uid] for t in trajs], self.cfg.rollout.tis_cap)
        n = distributed.all_reduce_sum(st["n"], self.d)
        out = {"tis_logp_abs_diff": distributed.all_reduce_sum(st["abs_diff_sum"], self.d) / max(1, n),
               "tis_capped_share": distributed.all_reduce_sum(st["capped"], self.d) / max(1, n)}
        return [a * wi.to(a.device, a.dtype) for a, wi in zip(tok_adv, w)], out

    def release_engine_weights(self) -> None:
        """Free the engine's weight copy while it is not needed (e.g. during the policy update):
        the memory goes back to the allocator for training; the next `sync_engine` reallocates
        and refills it. The engine must not run in between. vLLM: sleep (weights and KV cache
        discarded) where vLLM supports it (GPU); on CPU vLLM has no sleep mode and keeps its
        memory, only a staging copy (`engine.model`) is freed."""
        if self.cfg.rollout.engine == "vllm" and not self._engine_asleep:
            self._engine_asleep = self.engine.sleep()
        model = getattr(self.engine, "model", None)
        if self._engine_released is None and model is not None:
            self._engine_released = release_storage(model)

    @torch.no_grad()
    def sync_engine(self) -> float:
        """The policy's weights into the engine, gathered bucket by bucket (no full state dict
        on any rank); then the engine marks its sequences stale and drops its caches. Built-in
        engine: copied in place into its model. vLLM: streamed into one `reload_weights` (or via
        the staging copy where one is kept). Returns the seconds taken (logged as `engine_sync_s`)."""
        t0 = time.perf_counter()
        if self._engine_asleep:
            self.engine.wake()
            self._engine_asleep = False
        model = getattr(self.engine, "model", None)
        if self._engine_released is not None:
            restore_storage(self._engine_released)
            self._engine_released = None
        if model is None:   # vLLM without a staging copy
            from axpo.rollout.vllm_engine import streamed_weights

            self.engine.load_weights(streamed_weights(self.policy, bucket_bytes=self.sync_bucket_bytes))
            return time.perf_counter() - t0
        copy_gathered_weights(self.policy, model.state_dict(keep_vars=True), bucket_bytes=self.sync_bucket_bytes)
        # Built-in: the weights are in place already; load_weights of the model itself copies each
        # tensor onto itself (a no-op) and bumps the engine's weights version, dropping cached
        # logits. vLLM: reloads them from the staging copy.
        self.engine.load_weights(model)
        return time.perf_counter() - t0

    def load_policy(self, path: str) -> None:
        """A DCP checkpoint folder or a Hugging Face folder, into the policy and the engine."""
        load_weights(self.policy, path, self.d, dtype=self._dtype)
        self.sync_engine()

    # -- stages -----------------------------------------------------------------------------

    def run(self) -> None:
        t0 = time.time()
        cfg = self.cfg
        stages = {"pretrain": cfg.pretrain, "sft": cfg.sft, "rl": cfg.rl}
        stage, done = "pretrain", 0
        evals_path = self.run_dir / "evals.json"
        evals = {}
        if cfg.trainer.resume and evals_path.exists():
            try:
                evals = json.loads(evals_path.read_text())
            except json.JSONDecodeError as e:   # redone below
                if self.d.main:
                    print(f"{evals_path} is not valid JSON ({e}); its evaluations are redone", flush=True)
        if self.resume_from is not None:
            path, meta, _ = self.resume_from
            stage, done = meta["stage"], meta["step"]
            self._make_optimizer(stages[stage])
            self.ckpt.load(self.policy, self.optimizer, self.scheduler, path)
            # What came after the checkpoint is redone: its metrics rows and evaluations go.
            if stage != "rl":
                evals.pop("after_sft", None)
            evals.pop("after_rl", None)
            for k in [k for k in evals if k.startswith("rl_step_")]:
                if stage != "rl" or int(k[len("rl_step_"):]) > done:
                    evals.pop(k)
            if self.d.main:
                dropped = self.log.truncate_after(stage, done, keep_evals=[0] if "after_sft" in evals else [])
                print(f"resumed from {path} ({stage} step {done})"
                      + (f"; dropped {dropped} metrics rows logged after it" if dropped else ""), flush=True)
        elif cfg.trainer.init_from:
            self.load_policy(cfg.trainer.init_from)
            stage = cfg.trainer.init_stage
        # Each stage starts with a fresh optimiser and schedule, unless resumed mid-stage.
        for name, train in (("pretrain", self.pretrain), ("sft", self.sft)):
            if stage != name:
                continue
            if done < stages[name].steps:
                if self.optimizer is None:
                    self._make_optimizer(stages[name])
                train(done)
            self.optimizer = None
            stage, done = {"pretrain": "sft", "sft": "rl"}[name], 0
        if self.optimizer is None:
            self._make_optimizer(cfg.rl)
        self.sync_engine()
        if "after_sft" not in evals and cfg.trainer.eval_after_sft:
            evals["after_sft"] = self.evaluate("after_sft")
            self._save_evals(evals)
        self._evals = evals   # RL adds its periodic evaluations (trainer.eval_every)
        if done < cfg.rl.steps:
            self.rl(done)
        self.sync_engine()
        evals["after_rl"] = self.evaluate("after_rl")
        self._save_evals(evals)
        export_hf(self.policy, self.processor, self.run_dir / "hf", self.d, bucket_bytes=self.sync_bucket_bytes)
        if self.d.main:
            if cfg.trainer.plots:
                for name in ("pretrain", "sft", "rl"):
                    plot_run(self.run_dir, name)
            write_summary(self.run_dir, evals=evals, wall_time=time.time() - t0,
                          config_name=cfg.trainer.output_dir)

    def _save_evals(self, evals: dict) -> None:
        if self.d.main:
            (self.run_dir / "evals.json").write_text(json.dumps(evals, indent=1))

    _evals: dict | None = None   # evals.json's content while run() runs

    def evaluate(self, name: str, *, log_row: bool = True) -> dict:
        """Pass@k on the eval set with the engine's current weights. `log_row`: an `eval` row in
        metrics.jsonl (after_sft: step 0, after_rl: step 1); periodic RL evaluations go into
        their RL step's row instead."""
        if not self.cfg.trainer.evaluate:
            return {}
        t = time.time()
        out = evaluate(self.loop, self.src.eval, self.src.reward_fn("eval"),
                       n=self.cfg.trainer.eval_samples, d=self.d)
        out["eval_time_s"] = time.time() - t
        if self.d.main:
            print(f"eval {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items()
                                               if isinstance(v, float)), flush=True)
            if log_row:
                self.log.log("eval", {"after_sft": 0, "after_rl": 1}.get(name, 2), out)
        return out

    def _periodic_eval(self, step: int, metrics: dict) -> None:
        """`trainer.eval_every`: evaluate after RL step `step` (not the last: after_rl follows),
        into the step's metrics as eval/<name> and into evals.json as rl_step_<step>. Evaluation
        seeds are fixed (evaluate's `step`), so successive evaluations sample the same way."""
        every = self.cfg.trainer.eval_every
        if not (every > 0 and step % every == 0 and step < self.cfg.rl.steps and self.cfg.trainer.evaluate):
            return
        out = self.evaluate(f"rl_step_{step}", log_row=False)
        metrics.update({f"eval/{k}": v for k, v in out.items()})
        if self._evals is not None:
            self._evals[f"rl_step_{step}"] = out
            self._save_evals(self._evals)

    def _checkpoint(self, stage: str, step: int, total: int) -> None:
        every = getattr(self.cfg, stage).checkpoint_every
        every = self.cfg.trainer.checkpoint_every if every is None else every
        if step == total or (every > 0 and step % every == 0):
            self.ckpt.save(self.policy, self.optimizer, self.scheduler, stage=stage, step=step)
        # Crash drill: AXPO_KILL_AFTER=rl:3 SIGKILLs this process right after that step (no cleanup,
        # like a lost node), so resume can be tested deterministically.
        if os.environ.get("AXPO_KILL_AFTER") == f"{stage}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def _check_skipped(self, stage: str, step: int, metrics: dict) -> None:
        """Count steps skipped for a non-finite loss or gradient norm (the same on every rank: both
        are global); `trainer.max_skipped_steps` of them in a row stop the run."""
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if metrics.get("skipped", 0) > 0 else 0
        limit = self.cfg.trainer.max_skipped_steps
        if limit and self._skipped_in_a_row >= limit:
            raise FloatingPointError(
                f"{stage} step {step}: {self._skipped_in_a_row} steps in a row were skipped for a non-finite loss "
                f"or gradient norm (last: loss {metrics.get('loss')}, grad_norm {metrics.get('grad_norm')}); "
                f"stopping (trainer.max_skipped_steps={limit}). Lower the learning rate or check the data; "
                "the steps are in metrics.jsonl with skipped=1.")

    def _supervised_step(self, rows: list[TrainingRow], masks: list[list[int]], budget: int) -> dict:
        """One optimiser step on the masked next-token NLL (`update.supervised_update`), then the
        schedule's."""
        loss_all, norm, skipped, g_tok = supervised_update(self.policy, self.optimizer, rows, masks, fmt=self.fmt,
                                                           d=self.d, budget=budget, grad_clip=self.cfg.optim.grad_clip)
        if not skipped:
            self.scheduler.step()
        return {"loss": loss_all, "grad_norm": norm, "skipped": float(skipped),
                "lr": self.scheduler.get_last_lr()[0], "tokens": g_tok}

    def pretrain(self, start: int) -> None:
        """Copy pre-training (axpo/pretrain.py): each rank trains on its share of the step's
        sequences; held-out copy accuracy is measured on the engine's synced copy every
        `PRETRAIN_EVAL_EVERY` steps and at the end."""
        cfg, d = self.cfg, self.d
        seqs = CopySequences(self.processor.tokenizer)
        held_x, held_m = seqs.held_out()
        self.log.start_stage("pretrain", cfg.pretrain.steps, start)
        for step in range(start, cfg.pretrain.steps):
            t = time.time()
            batch = seqs.step_batch(cfg.trainer.seed, step, cfg.pretrain.questions_per_step)[d.rank::d.world]
            rows = [TrainingRow(x) for x, _ in batch]
            metrics = self._supervised_step(rows, [m for _, m in batch], cfg.pretrain.micro_batch_tokens)
            if (step + 1) % PRETRAIN_EVAL_EVERY == 0 or step + 1 == cfg.pretrain.steps:
                self.sync_engine()   # all ranks gather; rank 0 measures on its full copy
                if d.main:
                    metrics["copy_accuracy"] = copy_accuracy(self.engine.model, held_x, held_m)
            metrics["step_time"] = time.time() - t
            self.log.log("pretrain", step + 1, metrics)
            self._check_skipped("pretrain", step + 1, metrics)
            self._checkpoint("pretrain", step + 1, cfg.pretrain.steps)

    def sft(self, start: int) -> None:
        cfg, d = self.cfg, self.d
        demos = self.src.demos
        self.log.start_stage("sft", cfg.sft.steps, start)

        def encoded(step: int) -> list:
            idx = take(len(demos), cfg.sft.questions_per_step, step, cfg.trainer.seed)[d.rank::d.world]
            return [self._encoded_demo(i) for i in idx]

        # The next step's demonstrations are made (real tool runs: a sandboxed python call is a
        # process start) and encoded in a background thread while this step trains. A
        # demonstration depends only on its index, so the steps see exactly what they saw before.
        with ThreadPoolExecutor(1, thread_name_prefix="axpo-demos") as pool:
            ahead = pool.submit(encoded, start) if start < cfg.sft.steps else None
            try:
                for step in range(start, cfg.sft.steps):
                    t = time.time()
                    enc = ahead.result()
                    ahead = pool.submit(encoded, step + 1) if step + 1 < cfg.sft.steps else None
                    rows = [TrainingRow.of_demo(e) for e in enc]
                    metrics = self._supervised_step(rows, [e.loss_mask for e in enc], cfg.sft.micro_batch_tokens)
                    dt = time.time() - t
                    self.log.log("sft", step + 1, {**metrics, "tokens_per_s": metrics["tokens"] / dt, "step_time": dt})
                    self._check_skipped("sft", step + 1, metrics)
                    self._checkpoint("sft", step + 1, cfg.sft.steps)
            finally:
                if ahead is not None:
                    ahead.cancel()

    def _encoded_demo(self, i: int):
        # In SFT this runs in the prefetch thread, one call at a time: the cache needs no lock.
        if i not in self._demo_cache:
            demo = self.src.demos[i]
            self._demo_cache[i] = encode_demo(demo.messages, demo.images, self.fmt,
                                              self.src.tools.schemas(demo.tools))
        return self._demo_cache[i]

    def _reference_policy(self) -> PolicyModel:
        """The frozen policy of the KL term: the weights RL started from (`init_from`, else the
        final SFT checkpoint, else the current weights), so a resumed run uses the same one.
        Sharded like the policy (same units and compute dtype), built from the meta skeleton."""
        d = self.d
        ref = distributed.shard(PolicyModel(copy.deepcopy(self._skeleton)), d,
                                mixed_precision=self._dtype == torch.float32, activation_checkpointing=False)
        materialize(ref, d.device, buffers_from=self.policy)
        src = self.cfg.trainer.init_from if self.cfg.trainer.init_stage == "rl" else None
        if src is None:
            done = sorted(self.ckpt.root.glob("step_sft_*"))
            src = str(done[-1]) if done else None
        if src is not None:
            load_weights(ref, src, d, dtype=self._dtype)
        else:   # the current weights: the same shards on the same ranks, copied locally
            copy_local_weights(ref, self.policy)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref.eval()

    def rl(self, start: int) -> None:
        cfg, d = self.cfg, self.d
        a = cfg.algo
        train = self.src.train
        reward = self.src.reward_fn("train")
        ref = self._reference_policy() if a.beta > 0 else None
        self.log.start_stage("rl", cfg.rl.steps, start)
        for step in range(start, cfg.rl.steps):
            t = time.time()
            qs = take(len(train), cfg.rl.questions_per_step, step, cfg.trainer.seed + 1)
            mine = qs[d.rank::d.world]
            samples = [train[i] for i in mine]
            base = self.loop.rollout(samples, cfg.rollout.group_size, step=step)
            for tr in base:
                tr.reward = reward(tr)
            # vLLM returns no entropies; selection needs them before each cut (see _fill_entropies).
            trainer_logps = {}
            if not getattr(self.engine, "provides_entropies", True) and (a.axpo or (a.brute_force and a.brute_force_plan == "axpo")):
                trainer_logps = self._fill_entropies(base)
            by_group = dict(enumerate(samples))
            trajs, diag = expand(self.loop, base, by_group, reward, a, step=step,
                                 seed=cfg.trainer.seed, mask_truncated=cfg.rollout.mask_truncated)
            self.loop.release(trajs)
            # This step's training rollouts (base and extra) on all ranks, one collective.
            counts = RolloutCounts.of(trajs).summed_over_ranks(d)
            t_roll = time.time() - t
            trained = [not (cfg.rollout.mask_truncated and tr.truncated) for tr in trajs]
            seq_adv, tok_adv, masks = assign(trajs, a, trained)
            for tr in trajs:
                tr.check(self.fmt.image_pad, self.fmt.merge_size)
            tis = {}
            if cfg.rollout.tis_cap > 0:
                tok_adv, tis = self._tis(trajs, tok_adv, trainer_logps)
            if cfg.rollout.release_weights_during_update:
                self.release_engine_weights()   # restored by the sync after the update
            stats = policy_update(
                self.policy, self.optimizer, trajs, tok_adv, masks, fmt=self.fmt, d=d,
                budget=cfg.rl.micro_batch_tokens, temperature=cfg.rollout.temperature,
                clip_low=a.clip_low, clip_high=a.clip_high, beta=a.beta, agg=a.loss_agg,
                epochs=a.ppo_epochs, grad_clip=cfg.optim.grad_clip, ref_policy=ref)
            with warnings.catch_warnings():
                # A step whose rollouts were all masked takes no optimiser step; the schedule still
                # advances by one step, as it would have otherwise.
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                self.scheduler.step()
            stats.update(tis, engine_sync_s=self.sync_engine())
            gen_tokens = counts.new_tokens
            # Every rate from its numerator and denominator summed over ranks (truncated_rate too).
            diag = reduce_diagnostics(diag, d)
            dt = time.time() - t
            metrics = {**diag, **stats, "reward": diag["accuracy"], "lr": self.scheduler.get_last_lr()[0],
                       "rollout_time": t_roll, "step_time": dt, "tokens_per_s": gen_tokens / dt,
                       "rollout_tokens": gen_tokens,
                       "tool_errors": counts.tool_errors}
            self._periodic_eval(step + 1, metrics)   # after the sync: the engine holds this step's weights
            self.log.log("rl", step + 1, metrics)
            self._check_skipped("rl", step + 1, metrics)
            self._checkpoint("rl", step + 1, cfg.rl.steps)

    def close(self, clean: bool = True) -> None:
        self.log.close()
        distributed.close(barrier=clean)
