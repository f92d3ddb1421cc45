"""A vLLM rollout backend with the built-in Engine's interface (`rollout.engine=vllm`).

The agent loop drives an engine through `add` / `extend` / `generate` / `fork` / `fork_at` /
`free` / `load_weights` (axpo/agent/loop.py). This class offers the same methods on top of
`vllm.LLM`, token-in/token-out:

- A sequence is bookkeeping only: its token ids (image pad runs expanded, exactly the ids the
  trajectory and the trainer hold), its image spans and one image per span. vLLM keeps no state
  between calls: every `generate` submits each row's whole prefix as `prompt_token_ids`, and
  vLLM's automatic prefix cache serves the part it has seen (the previous turns' prompt and
  sampled tokens; `stats["cached_tokens"]` / `stats["cached_share"]` say how much).
- Multi-turn continuation: `extend` appends tool-response tokens (and images) to the sequence; the
  next `generate` resubmits the prefix. After each request the ids vLLM expanded are checked
  against ours (an image whose grid vLLM computes differently fails loudly, never silently).
- Images: vLLM's Qwen-VL processor takes images, not pixel values, and expands ONE
  `<|image_pad|>` per image itself. The engine receives the trainer's pixel values (the loop's
  `pixel_values` / `image_grid_thw`), so it rebuilds each 8-bit image at its resized size from the
  patches (de-normalise, un-patchify, round) and submits it with one pad token. vLLM's processor
  then resizes by a factor of exactly 1 and normalises again, reproducing the trainer's pixel
  values to fp32 rounding (2e-7). Pixel values that do not come from 8-bit images normalised with
  the processor's mean/std are refused.
- Forks: `fork(seq, n)` / `fork_at(seq, cut, n)` copy the bookkeeping; the branches' first
  `generate` resubmits the shared prefix, which the prefix cache serves once computed. (vLLM v1
  implements `SamplingParams(n=k)` the same way: k child requests with seeds seed, seed+1, ...
  sharing cached blocks; per-row requests keep the loop's per-row seeds.)
- Sampling: per-row seeds (`SamplingParams.seed`, vLLM's per-request generator: reproducible and
  independent of the batch; on CPU prompts are never prefilled in chunks, see __init__), stop tokens (kept in the output, EOS not implied: `ignore_eos`),
  `max_tokens`, top-k/top-p, banned ids as `logit_bias` -100 (vLLM's bound).
- Log-probs: vLLM's `raw_logprobs` of each sampled token, i.e. log softmax of the unprocessed
  logits, before banning, top-k and top-p: the same quantity the built-in engine returns (and
  the trainer recomputes) for temperature 1 and for greedy decoding (T = 0 reports T = 1
  log-probs in both engines). vLLM cannot return the temperature-scaled untruncated log-prob, so a
  temperature other than 0 or 1 is refused rather than mislabelled.
- Entropies: vLLM returns none. `provides_entropies` is False and `Completion.entropies` holds NaN
  (never a plausible-looking 0.0). AXPO's selection needs the entropy before each cut, so the
  caller computes them with the policy's no-grad fused log-prob + entropy pass:
  `fill_entropies(policy, trajs, ...)` below (one forward that also yields recomputed log-probs).
- Weights: `load_weights` takes a state dict with Hugging Face names, an iterable of
  (name, tensor) pairs or a model, and loads it with `collective_rpc("reload_weights")` (tensors
  in process; written to a safetensors file for a multi-process engine, a path the tests do not
  exercise: they run in process), then resets vLLM's
  prefix and encoder caches. The time is logged and kept in `stats`. As in the built-in engine,
  sequences from before the sync become read-only.

vLLM is optional: importing this module does not import it; constructing `VLLMEngine` without it
raises an ImportError that names what to install.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from axpo.config_checks import VLLM_INSTALL_HINT as INSTALL_HINT  # one wording for the error and the config check
from axpo.rollout.positions import add_chunk_spans, positions, span_containing, spans_before
from axpo.rollout.sampling import Completion, SamplingParams

__all__ = ["VLLMEngine", "fill_entropies", "require_vllm", "streamed_weights", "tis_weights", "SamplingParams",
           "Completion"]

log = logging.getLogger(__name__)



def require_vllm():
    """Import vllm, or raise an ImportError that says what to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.engine=vllm needs vLLM, which is not importable ({e}); {INSTALL_HINT}") from e
    except (OSError, RuntimeError) as e:
        hint = ""
        if "torchvision" in str(e):
            hint = (" torchvision's C++ extension does not match this torch (PyPI's torchvision is a CUDA "
                    "build); the CPU environment from .ci/vllm_env.sh installs tests/vllm_env/"
                    "axpo_torchvision_cpu.pth for exactly this.")
        elif "torchcodec" in str(e) or "torchaudio" in str(e):
            hint = " uninstall torchcodec/torchaudio (CUDA builds; images need neither), as .ci/vllm_env.sh does."
        raise ImportError(f"vLLM is installed but failed to import: {type(e).__name__}: {e}.{hint} "
                          f"{INSTALL_HINT}") from e
    return vllm


def _shutdown_if_group_alive(core) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        core.shutdown()


@dataclass
class _Seq:
    tokens: list[int]
    spans: tuple            # tuple[ImagePositions, ...], as the built-in engine keeps them
    images: list            # one PIL image per span, in order
    version: int
    pinned: bool = False


class VLLMEngine:
    """vLLM behind the built-in Engine's interface. `model`: a Hugging Face folder (weights, config
    and processor, as `save_pretrained` writes them) or a model, which is saved with `processor`
    into `workdir` (a temporary folder by default) for vLLM to load.

    `max_model_len` must cover `rollout.max_total_tokens`. `kv_cache_bytes` sizes vLLM's KV
    cache (CPU and GPU); `gpu_memory_utilization` applies on GPU when `kv_cache_bytes` is None.
    `max_images` is vLLM's per-prompt image limit (question and tool images of one trajectory)."""

    provides_entropies = False      # callers compute entropies with fill_entropies()

    def __init__(self, model, processor=None, *, dtype: str | torch.dtype = "float32", max_model_len: int = 4096,
                 max_images: int = 4, kv_cache_bytes: int | None = 1 << 30, gpu_memory_utilization: float = 0.5,
                 enable_prefix_caching: bool = True, enforce_eager: bool = True, seed: int = 0,
                 workdir: str | None = None, **llm_kwargs):
        # In process: collective_rpc can then hand weight tensors to the worker directly. An
        # explicit VLLM_ENABLE_V1_MULTIPROCESSING=1 is respected (weights then go through a file).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = require_vllm()
        self._tmp = None
        if isinstance(model, torch.nn.Module):
            if processor is None:
                raise ValueError("VLLMEngine: pass the processor with a model object (vLLM loads a folder)")
            model_dir = self._save_folder(model, processor, workdir)
        else:
            model_dir = str(model)
        self.model_dir = model_dir
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.image_token_id = cfg.get("image_token_id")
        self.merge = (cfg.get("vision_config") or {}).get("spatial_merge_size", 2)
        self._image_proc = _image_processor_params(processor, model_dir)
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        kwargs = dict(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                      enable_prefix_caching=enable_prefix_caching, seed=seed, logprobs_mode="raw_logprobs",
                      limit_mm_per_prompt={"image": max_images, "video": 0},
                      gpu_memory_utilization=gpu_memory_utilization)
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        from vllm.platforms import current_platform

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Under torchrun each rank runs its own engine in its own process (TRL's colocate mode):
            # the external launcher makes vLLM use the process group torchrun already set up
            # (tensor_parallel_size 1 per rank) instead of initialising a second world of size 1.
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.can_sleep = not current_platform.is_cpu() and bool(llm_kwargs.get("enable_sleep_mode"))
        if current_platform.is_cpu():
            # vLLM 0.32 on CPU: when a seeded request is prefilled in chunks, the token sampled after
            # a partial chunk is discarded by rewinding its generator's offset, which CPU generators
            # do not have ("RuntimeError: CPU Generator does not use offset"). So never chunk: a
            # prompt waits for a step whose token budget holds all of it.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        kwargs.update(llm_kwargs)
        self._external = kwargs.get("distributed_executor_backend") == "external_launcher"
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.init_seconds = time.perf_counter() - t0
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if self.in_process:
            # vLLM shuts its in-process core down from a weakref finalizer at exit, and that
            # shutdown destroys torch's process groups (the trainer's under torchrun; in a single
            # process the world of 1 vLLM set up itself): after the trainer's own teardown already
            # destroyed them it raises "Invalid process group specified" (seen at the end of runs
            # with 1 and 2 ranks). Shut down only while the group lives.
            client = self.llm.llm_engine.engine_core
            fin = getattr(client, "_finalizer", None)
            if fin is not None and fin.detach() is not None:
                client._finalizer = weakref.finalize(client, _shutdown_if_group_alive, client.engine_core)
        self.max_model_len = max_model_len
        self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
        self.last_cached_tokens: list[int] = []     # num_cached_tokens of each row of the last generate
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        self._version = 0
        self._count = dict(requests=0, generate_calls=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0,
                           forks=0, weight_syncs=0, generate_seconds=0.0, last_weight_sync_seconds=0.0)

    def _save_folder(self, model, processor, workdir: str | None) -> str:
        """Write `model` + `processor` as the Hugging Face folder vLLM loads. Under torch.distributed
        transformers' save_pretrained writes on rank 0 only, so rank 0 writes one folder that every
        rank's engine loads (colocated engines, one node: the folder is local to all of them; the
        other ranks' models need not hold the weights yet, the trainer's first sync fills them)."""
        import torch.distributed as dist

        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        main = not multi or dist.get_rank() == 0
        if workdir is None:
            if main:
                self._tmp = tempfile.TemporaryDirectory(prefix="axpo-vllm-")
                workdir = self._tmp.name
            if multi:
                box = [workdir]
                dist.broadcast_object_list(box, src=0)
                workdir = box[0]
        if main:
            model.save_pretrained(workdir)
            processor.save_pretrained(workdir)
        if multi:
            dist.barrier()
        return workdir

    # -- sequences (the built-in Engine's interface) ----------------------------------------

    def add(self, token_ids: list[int], *, pixel_values=None, image_grid_thw=None) -> int:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("add: empty token list")
        sid = self._new(_Seq([], (), [], self._version))
        try:
            self._append(self._seqs[sid], ids, pixel_values, image_grid_thw, "add")
        except BaseException:
            del self._seqs[sid]
            raise
        return sid

    def extend(self, seq_id: int, token_ids: list[int], *, pixel_values=None, image_grid_thw=None) -> None:
        s = self._get(seq_id, "extend", write=True)
        ids = [int(t) for t in token_ids]
        if ids:
            self._append(s, ids, pixel_values, image_grid_thw, "extend")

    def add_many(self, chunks: list[list[int]], mm: list[dict] | None = None) -> list[int]:
        """`add` of each (vLLM prefills when it generates, batched there); all or nothing."""
        mm = mm or [{}] * len(chunks)
        if len(mm) != len(chunks):
            raise ValueError(f"add_many: {len(chunks)} chunks but {len(mm)} image entries")
        sids = []
        try:
            for ids, m in zip(chunks, mm):
                sids.append(self.add(ids, **m))
        except BaseException:
            for sid in sids:
                del self._seqs[sid]
            raise
        return sids

    def extend_many(self, seq_ids: list[int], chunks: list[list[int]], mm: list[dict] | None = None) -> None:
        mm = mm or [{}] * len(seq_ids)
        if not len(seq_ids) == len(chunks) == len(mm):
            raise ValueError(f"extend_many: {len(seq_ids)} sequences, {len(chunks)} chunks, {len(mm)} image entries")
        for sid, ids, m in zip(seq_ids, chunks, mm):
            self.extend(sid, ids, **m)

    def generate(self, seq_ids: list[int], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """One request per row: the row's whole prefix, sampled until a stop token or max_tokens.
        Sampled tokens are appended to the sequences."""
        seq_ids = list(seq_ids)
        if isinstance(params, SamplingParams):
            params = [params] * len(seq_ids)
        if len(params) != len(seq_ids):
            raise ValueError(f"generate: {len(seq_ids)} sequences but {len(params)} SamplingParams")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("generate: a sequence id is listed twice")
        if not seq_ids:
            return []
        seqs = [self._get(s, "generate", write=True) for s in seq_ids]
        prompts = [self._prompt(s) for s in seqs]
        vparams = [self._params(p, len(s.tokens)) for p, s in zip(params, seqs)]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, vparams, use_tqdm=False)
        self._count["generate_seconds"] += time.perf_counter() - t0
        self._count["generate_calls"] += 1
        result = []
        self.last_cached_tokens = [int(o.num_cached_tokens or 0) for o in outs]
        for sid, s, out in zip(seq_ids, seqs, outs):
            if list(out.prompt_token_ids) != s.tokens:
                raise RuntimeError(
                    f"generate: vLLM expanded sequence {sid} to {len(out.prompt_token_ids)} prompt tokens, the "
                    f"sequence has {len(s.tokens)}: its processor sized an image differently from the trainer's "
                    "(check the folder's preprocessor config against the processor the trainer uses)")
            o = out.outputs[0]
            toks = list(o.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(o.logprobs, toks)]
            finish = "stop" if o.finish_reason == "stop" else "length"
            if o.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"generate: vLLM finished sequence {sid} with {o.finish_reason!r}")
            s.tokens.extend(toks)
            result.append(Completion(toks, lps, [math.nan] * len(toks), finish))
            self._count["requests"] += 1
            self._count["prompt_tokens"] += len(s.tokens) - len(toks)
            self._count["cached_tokens"] += int(out.num_cached_tokens or 0)
            self._count["generated_tokens"] += len(toks)
        return result

    def fork(self, seq_id: int, n: int) -> list[int]:
        s = self._get(seq_id, "fork")
        return self._children(s, len(s.tokens), n)

    def fork_at(self, seq_id: int, num_tokens: int, n: int) -> list[int]:
        """n children holding tokens [0, num_tokens) (and the images before the cut); their first
        generate resubmits that prefix, served by the prefix cache."""
        s = self._get(seq_id, "fork_at")
        return self._children(s, self._check_cut(s, num_tokens, "fork_at"), n)

    def free(self, seq_id: int) -> None:
        s = self._seqs.get(seq_id)
        if s is None:
            raise ValueError(self._missing(seq_id, "free"))
        if s.pinned:
            raise ValueError(f"free: sequence {seq_id} is pinned; release it with unpin")
        del self._seqs[seq_id]

    def free_many(self, seq_ids: list[int]) -> None:
        seq_ids = list(seq_ids)
        for sid in seq_ids:                 # validated first: all or nothing
            if sid not in self._seqs or self._seqs[sid].pinned:
                raise ValueError(self._missing(sid, "free_many") if sid not in self._seqs
                                 else f"free_many: sequence {sid} is pinned")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("free_many: a sequence id is listed twice")
        for sid in seq_ids:
            del self._seqs[sid]

    def tokens(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id, "tokens", fresh=False).tokens)

    def positions(self, seq_id: int) -> torch.Tensor:
        s = self._get(seq_id, "positions", fresh=False)
        return positions(s.spans, 0, len(s.tokens))

    def next_token_logits(self, seq_id: int) -> torch.Tensor:
        raise NotImplementedError("next_token_logits: the vLLM backend returns sampled-token log-probs only; "
                                  "use the policy's forward")

    def pin(self, seq_id: int, num_tokens: int | None = None) -> int:
        s = self._get(seq_id, "pin")
        t = self._check_cut(s, len(s.tokens) if num_tokens is None else num_tokens, "pin")
        spans = spans_before(s.spans, t)
        return self._new(_Seq(s.tokens[:t], spans, s.images[:len(spans)], s.version, pinned=True))

    def unpin(self, pin_id: int) -> None:
        s = self._seqs.get(pin_id)
        if s is None or not s.pinned:
            raise ValueError(f"unpin: {pin_id} is not a pinned prefix")
        del self._seqs[pin_id]

    @contextlib.contextmanager
    def pinned(self, seq_id: int, num_tokens: int | None = None):
        pid = self.pin(seq_id, num_tokens)
        try:
            yield pid
        finally:
            self.unpin(pid)

    # -- weights & stats ------------------------------------------------------------------------

    def load_weights(self, weights) -> float:
        """New policy weights: a state dict with Hugging Face names (a `hf.` prefix, as
        PolicyModel's, is dropped), an iterable of (name, tensor) or a model. Resets the prefix and
        encoder caches; older sequences become read-only. Returns the seconds taken.

        In process the pairs are handed to vLLM lazily, one tensor at a time, in one
        `reload_weights` call (a generator such as `streamed_weights` is consumed as vLLM loads:
        no full copy of the weights is built). One call, not one per bucket: vLLM's in-place reload
        rebuilds a layer once all of its tensors arrived and restores every layer a call did not
        mention, so a layer split across calls would be rebuilt from a partial load."""
        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        items = weights.items() if isinstance(weights, dict) else weights
        count = [0]

        def pairs():
            for name, t in items:
                if name.startswith("hf."):
                    name = name[3:]
                if hasattr(t, "full_tensor"):
                    t = t.full_tensor()
                count[0] += 1
                yield name, t.detach()

        t0 = time.perf_counter()
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs()})
        else:   # tensors cannot cross collective_rpc's process boundary: hand over a file
            from safetensors.torch import save_file

            d = tempfile.mkdtemp(prefix="axpo-vllm-weights-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            try:
                save_file({n: t.contiguous() for n, t in pairs()}, os.path.join(d, "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": d})
            finally:
                import shutil

                shutil.rmtree(d, ignore_errors=True)
        self.llm.reset_prefix_cache()
        # Without this the next image prompt fails with "Encoder cache miss" (scheduler-side state).
        self.llm.llm_engine.reset_encoder_cache()
        dt = time.perf_counter() - t0
        self._version += 1
        self._count["weight_syncs"] += 1
        self._count["last_weight_sync_seconds"] = dt
        log.info("vLLM weight sync: %d tensors in %.3f s", count[0], dt)
        return dt

    def sleep(self) -> bool:
        """Free vLLM's weights and KV cache while training runs (`rollout.release_weights_during_update`):
        vLLM's sleep level 2 (weights discarded, not offloaded: the next sync reloads them).
        Only where vLLM supports it: CUDA/ROCm with `enable_sleep_mode=True` at construction; on
        CPU sleep mode does not exist in vLLM 0.32 (a no-op there), so this returns False and
        keeps everything. Sequences must not be used until `wake` and a weight sync."""
        if not self.can_sleep or self._asleep:
            return False
        self.llm.sleep(level=2)
        self._asleep = True
        return True

    def wake(self) -> None:
        """Reallocate what `sleep` freed (weights undefined until the next `load_weights`)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    _asleep = False

    @property
    def stats(self) -> dict:
        c = dict(self._count)
        c["cached_share"] = c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0
        c.update(sequences=sum(not s.pinned for s in self._seqs.values()),
                 pinned=sum(s.pinned for s in self._seqs.values()), weights_version=self._version,
                 engine="vllm", vllm_version=self._vllm.__version__, init_seconds=self.init_seconds)
        return c

    def reset_stats(self) -> None:
        for k in self._count:
            self._count[k] = 0.0 if isinstance(self._count[k], float) else 0

    def close(self) -> None:
        """Release vLLM (its memory, its KV cache) and the temporary model folder."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            # Under the external launcher vLLM's shutdown destroys torch's default process group,
            # which belongs to the trainer (measured: the trainer's next collective then fails).
            if not getattr(self, "_external", False):
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- internals ------------------------------------------------------------------------------

    def _new(self, s: _Seq) -> int:
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = s
        return sid

    def _missing(self, seq_id: int, op: str) -> str:
        if 0 <= seq_id < self._next_id:
            return f"{op}: sequence {seq_id} was already freed"
        return f"{op}: unknown sequence {seq_id}"

    def _get(self, seq_id: int, op: str, *, write: bool = False, fresh: bool = True) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None:
            raise ValueError(self._missing(seq_id, op))
        if fresh and s.version != self._version:
            raise ValueError(f"{op}: sequence {seq_id} was started with older weights (load_weights was called "
                             "since); free it")
        if write and s.pinned:
            raise ValueError(f"{op}: sequence {seq_id} is pinned (read-only); fork it to continue")
        return s

    @staticmethod
    def _check_cut(s: _Seq, t: int, op: str) -> int:
        if not 1 <= t <= len(s.tokens):
            raise ValueError(f"{op}: num_tokens {t} out of range [1, {len(s.tokens)}]")
        span = span_containing(s.spans, t)
        if span is not None:
            raise ValueError(f"{op}: token {t} is inside the image at tokens [{span.start}, {span.end}); "
                             "cut before or after the whole image")
        return t

    def _children(self, s: _Seq, t: int, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"fork: n must be >= 0, got {n}")
        spans = spans_before(s.spans, t)
        ids = [self._new(_Seq(s.tokens[:t], spans, s.images[:len(spans)], s.version)) for _ in range(n)]
        self._count["forks"] += n
        return ids

    def _append(self, s: _Seq, chunk: list[int], pixel_values, image_grid_thw, op: str) -> None:
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError(f"{op}: pass pixel_values and image_grid_thw together")
        grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in torch.as_tensor(image_grid_thw).tolist()]
        spans = add_chunk_spans(s.spans, len(s.tokens), chunk, self.image_token_id, grids, self.merge)
        images = []
        if grids:
            want = sum(t * h * w for t, h, w in grids)
            if pixel_values.shape[0] != want:
                raise ValueError(f"{op}: pixel_values has {pixel_values.shape[0]} patches, the grids need {want}")
            images = _images_from_pixel_values(pixel_values, grids, self._image_proc, op)
        if len(spans) - len(s.spans) != len(images):
            raise ValueError(f"{op}: {len(spans) - len(s.spans)} image pad runs for {len(images)} images")
        s.tokens.extend(chunk)
        s.spans = spans
        s.images.extend(images)

    def _prompt(self, s: _Seq) -> dict:
        """The row as vLLM wants it: one <|image_pad|> per image, plus the images."""
        if not s.spans:
            return {"prompt_token_ids": list(s.tokens)}
        ids, i = [], 0
        for sp in s.spans:
            ids += s.tokens[i:sp.start] + [self.image_token_id]
            i = sp.end
        ids += s.tokens[i:]
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": list(s.images)}}

    def _params(self, p: SamplingParams, prompt_len: int):
        if p.temperature not in (0.0, 1.0):
            raise ValueError(
                f"vLLM backend: temperature {p.temperature} is not supported: vLLM returns the sampled token's "
                "log-prob of the raw (T=1) distribution, not of softmax(logits/T), so the behaviour log-probs "
                "would not match the trainer's; use temperature 1 (or 0)")
        if prompt_len + p.max_tokens > self.max_model_len:
            raise ValueError(f"generate: {prompt_len} prompt tokens + max_tokens {p.max_tokens} exceed "
                             f"max_model_len {self.max_model_len}")
        return self._vllm.SamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens,
            stop_token_ids=list(p.stop_token_ids), ignore_eos=True, seed=p.seed, logprobs=0,
            logit_bias={int(t): -100.0 for t in p.banned_token_ids} or None, detokenize=False,
            skip_special_tokens=False)


# -- images: pixel values -> the 8-bit images they came from ------------------------------------

def _image_processor_params(processor, model_dir: str) -> dict:
    if processor is not None:
        ip = processor.image_processor
        get = lambda k, d=None: getattr(ip, k, d)  # noqa: E731
    else:
        cfg = {}
        for f in ("preprocessor_config.json", "processor_config.json"):
            p = Path(model_dir) / f
            if p.exists():
                cfg = json.loads(p.read_text())
                cfg = cfg.get("image_processor", cfg)
                break
        get = lambda k, d=None: cfg.get(k, d)  # noqa: E731
    return dict(mean=list(get("image_mean")), std=list(get("image_std")), patch=int(get("patch_size", 16)),
                temporal=int(get("temporal_patch_size", 2)), merge=int(get("merge_size", 2)),
                rescale=float(get("rescale_factor", 1 / 255)))


def _images_from_pixel_values(pixel_values: torch.Tensor, grids, ip: dict, op: str) -> list:
    """Invert the Qwen2-VL image processor: flattened patches [sum(t*h*w), C*tp*p*p] -> one RGB PIL
    image per grid, at the resized size (h*p, w*p). Exact for pixel values computed from 8-bit
    images with these mean/std (checked: every value must be within 0.05 of an 8-bit level)."""
    from PIL import Image

    p, tp, m = ip["patch"], ip["temporal"], ip["merge"]
    mean = torch.tensor(ip["mean"], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(ip["std"], dtype=torch.float64).view(3, 1, 1)
    out, row = [], 0
    for t, h, w in grids:
        n = t * h * w
        x = pixel_values[row:row + n].detach().to("cpu", torch.float64)
        row += n
        x = x.view(t, h // m, w // m, m, m, 3, tp, p, p)[:, :, :, :, :, :, 0]     # first frame of the pair
        x = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, 3, h * p, w * p)[0]
        levels = (x * std + mean) / ip["rescale"]
        u8 = levels.round()
        err = float((levels - u8).abs().max()) if levels.numel() else 0.0
        if err > 0.05 or float(u8.min()) < 0 or float(u8.max()) > 255:
            raise ValueError(f"{op}: these pixel values do not come from an 8-bit image normalised with the "
                             f"processor's mean/std (off by {err:.3f} levels); the vLLM backend needs them to rebuild "
                             "the image it hands to vLLM")
        out.append(Image.fromarray(u8.to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), "RGB"))
    return out


# -- entropies (and recomputed log-probs) with the policy's fused pass --------------------------

@torch.no_grad()
def fill_entropies(policy, trajs, *, pad_id: int, image_token_id: int, temperature: float = 1.0,
                   max_tokens_per_batch: int = 16384) -> list[list[float]]:
    """Set `t.entropies` of every trajectory from one no-grad forward of the policy
    (axpo.policy.PolicyModel: backbone + fused log-prob/entropy head, no [T, V] logits) and return
    the recomputed per-token log-probs (same layout as `t.logprobs`: entry i is the log-prob of
    token i, 0.0 for token 0). This is what an engine with `provides_entropies = False` needs
    before AXPO's selection; with the weights the rollout used, the log-probs it returns are the
    behaviour log-probs recomputed by the trainer (compare with the engine's to see the mismatch).

    Single process only as written: batches are cut by a token budget, so under FSDP ranks could
    run different numbers of forwards and hang; there, use the trainer's own no-grad recompute
    pass (equal micro-batch counts on every rank) with `return_entropy=True`."""
    from axpo.policy import pack

    was_training = policy.training
    policy.eval()
    logps = [None] * len(trajs)
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].tokens))
    batch: list[int] = []

    def run(idx):
        seqs = [{"tokens": trajs[i].tokens, "pixel_values": trajs[i].pixel_values,
                 "grids": [s.grid_thw for s in trajs[i].image_spans]} for i in idx]
        b = pack(seqs, pad_id, image_token_id, rows=list(idx))
        lp, ent = policy(b, temperature=temperature, return_entropy=True)
        for r, i in enumerate(idx):
            n = len(trajs[i].tokens)
            trajs[i].entropies = [0.0] + ent[r, :n - 1].float().tolist()
            logps[i] = [0.0] + lp[r, :n - 1].float().tolist()

    for i in order:
        if batch and (len(batch) + 1) * len(trajs[i].tokens) > max_tokens_per_batch:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
    policy.train(was_training)
    return logps


# -- weight sync from FSDP shards -----------------------------------------------------------------

def streamed_weights(module, *, bucket_bytes: int | None = None):
    """Yield `(hf_name, full_tensor)` for every entry of `module.state_dict()` (a PolicyModel, FSDP2
    sharded or not), assembled from `axpo.checkpoint.gathered_weights`' bucketed row pieces: one
    all-gather per bucket, each tensor yielded as soon as all its rows arrived, as a fresh tensor
    (vLLM keeps a layer's tensors until the layer is complete). Extra memory: one bucket plus the
    tensors of the layer vLLM is assembling, never a full state dict. Every rank must consume the
    whole stream (it runs collectives), also a rank whose engine does not need it."""
    from axpo.checkpoint import SYNC_BUCKET_BYTES, gathered_weights
    from axpo.models import canonical_name

    shapes = {canonical_name(k): (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    partial: dict[str, list] = {}       # name -> [tensor, rows still missing]
    for name, first, rows in gathered_weights(module, bucket_bytes=bucket_bytes or SYNC_BUCKET_BYTES):
        shape, dtype = shapes[name]
        if rows.dim() == 0 or (first == 0 and tuple(rows.shape) == shape):
            yield name, rows.clone()
            continue
        if name not in partial:
            partial[name] = [torch.empty(shape, dtype=rows.dtype, device=rows.device), shape[0]]
        entry = partial[name]
        entry[0].narrow(0, first, rows.shape[0]).copy_(rows)
        entry[1] -= rows.shape[0]
        if entry[1] == 0:
            yield name, partial.pop(name)[0]
    if partial:
        raise RuntimeError(f"streamed_weights: rows missing for {sorted(partial)[:5]}")


def tis_weights(trajs, trainer_logps, cap: float) -> tuple[list[torch.Tensor], dict]:
    """Truncated importance sampling for the train/rollout mismatch (verl's and TRL's TIS): per
    token, min(exp(trainer logp - engine logp), cap) on sampled tokens (loss_mask 1), 1 elsewhere
    (and for forced tokens, whose engine log-prob is a 0.0 placeholder).
    `trainer_logps[i]`: the trainer's log-probs of trajectory i under the rollout's weights (index
    j = token j, as `axpo.update.old_logprobs` returns them). Scaling a token's advantage by its
    weight w >= 0 scales that token's clipped surrogate by w exactly (min(r A w, clip(r) A w) =
    w min(r A, clip(r) A)), which is how the trainer applies it. Also returns the mismatch's
    summary: mean |trainer - engine| log-prob and the share of tokens whose weight was capped."""
    out, n, absdiff, capped = [], 0, 0.0, 0
    log_cap = math.log(cap)
    for t, lp in zip(trajs, trainer_logps):
        lp = torch.as_tensor(lp, dtype=torch.float32).cpu()
        eng = torch.tensor(t.logprobs, dtype=torch.float32)
        # A trained token with engine log-prob exactly 0.0 is a placeholder (algo.train_forced_call's
        # forced "<tool_call>", trained "as if sampled, no importance weight"): weight 1.
        m = torch.tensor(t.loss_mask, dtype=torch.bool) & (eng != 0.0)
        diff = (lp - eng).masked_fill(~m, 0.0)
        w = torch.exp(diff.clamp(max=log_cap)).masked_fill(~m, 1.0)
        out.append(w)
        n += int(m.sum())
        absdiff += float(diff.abs().sum())
        capped += int((diff > log_cap).logical_and(m).sum())
    return out, {"n": n, "abs_diff_sum": absdiff, "capped": capped}
