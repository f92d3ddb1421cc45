"""Multi-turn agent loop over the rollout engine: generate until `</tool_call>` or the end of the
turn, run the tool, append its response as tokens, continue until a final answer or a limit.

All live trajectories (every question's group, and AXPO's branches) advance together: each engine
call decodes one turn for the whole batch, so the batch stays wide while tools run in between, and
the prompts of a rollout, the tool responses of a turn and the forced openings of a branch set are
prefilled in packed forwards (`Engine.add_many` / `extend_many`), not one forward per sequence.
"""

from __future__ import annotations

import hashlib

from axpo.agent.format import AgentFormat, Chunk
from axpo.agent.trajectory import ImageSpan, ToolCallRecord, Trajectory
from axpo.config import RolloutConfig
from axpo.rollout.engine import Engine, SamplingParams
from axpo.tools.base import ToolContext, ToolRegistry


def _seed(*parts) -> int:
    """Stable per-(run seed, rollout, turn) sampling seed, independent of batch composition."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class AgentLoop:
    def __init__(self, engine: Engine, fmt: AgentFormat, tools: ToolRegistry, cfg: RolloutConfig,
                 seed: int = 0):
        self.engine, self.fmt, self.tools, self.cfg, self.seed = engine, fmt, tools, cfg, seed
        self._subsets: dict[tuple[str, ...], ToolRegistry] = {}

    # -- public -----------------------------------------------------------------------------

    def rollout(self, samples: list, n: int, *, step: int = 0, group_offset: int = 0, tag: str = "r",
                response_prefix: dict[str, list[int]] | None = None) -> list[Trajectory]:
        """`n` rollouts of each sample. The prompt is prefilled once per sample and forked n ways.
        `tag` distinguishes further rollout sets of the same question in one step (their seeds).
        `response_prefix` (by sample uid) prefills the start of the assistant's response, as if
        sampled (e.g. to force a reasoning opening or a tool call); a prefix that ends with
        `</tool_call>` has its call run before sampling starts."""
        trajs = []
        chunks = [self.fmt.prompt(s.question, s.images, self._schemas(s)) for s in samples]
        parents = self._add_many(chunks)       # every prompt in packed prefill forwards
        for g, (sample, chunk, parent) in enumerate(zip(samples, chunks, parents)):
            children = self.engine.fork(parent, n)
            self.engine.free(parent)
            for i, seq in enumerate(children):
                # The uid seeds sampling: it depends on the question, not on rank or batch layout.
                t = Trajectory(uid=f"s{step}-{sample.uid}-{tag}{i}", sample_uid=sample.uid,
                               group=group_offset + g, prompt_len=len(chunk.ids), seq_id=seq)
                self._append(t, chunk, from_tool=False)
                t.images.extend(sample.images)
                trajs.append(t)
                forced = (response_prefix or {}).get(sample.uid)
                if forced:
                    self.engine.extend(seq, list(forced))
                    t.append(list(forced), sampled=True)
                    if forced[-1] == self.fmt.tool_call_end:
                        t.turns += 1
                        more = self._after_turn(t, t.prompt_len, "stop", sample)
                        if more is not None:
                            self.engine.extend(t.seq_id, more.ids, **self._mm(more))
        self.run(trajs, {t.uid: s for t, s in zip(trajs, [s for s in samples for _ in range(n)])}, step=step)
        return trajs

    def branch(self, parent: Trajectory, cut: int, k: int, *, force_tool_call: bool, branch_set: int,
               train_forced: bool = False) -> list[Trajectory]:
        """k continuations of `parent` from token `cut` (the start of a tool call), forking the KV of
        tokens [0, cut) instead of re-prefilling them. The branches are not yet run.

        With `force_tool_call` the branch starts with "<tool_call>" prefilled. The policy did not
        sample that token, so by default it carries no loss (loss mask 0): a failed branch must not
        push P(<tool_call>) down as if the policy had chosen it, without any importance weight.
        `train_forced=True` (algo.train_forced_call) keeps the old behaviour: trained as if
        sampled (its behaviour log-prob is recomputed with the rest before the update)."""
        if parent.seq_id is None:
            raise ValueError(f"branch: rollout {parent.uid} was already released from the engine")
        if not parent.prompt_len <= cut <= len(parent.tokens):
            raise ValueError(f"branch: cut {cut} outside the response of {parent.uid}")
        seqs = self.engine.fork_at(parent.seq_id, cut, k)
        if force_tool_call:
            # The branch must act: "<tool_call>" is prefilled (one packed forward for all k); in the
            # loss only if train_forced.
            self._extend_many(seqs, [Chunk([self.fmt.tool_call], [], [], [])] * k)
        out = []
        for i, seq in enumerate(seqs):
            spans = [s for s in parent.image_spans if s.end <= cut]
            t = Trajectory(
                uid=f"{parent.uid}-b{branch_set}.{i}", sample_uid=parent.sample_uid, group=parent.group,
                prompt_len=parent.prompt_len, tokens=parent.tokens[:cut],
                loss_mask=parent.loss_mask[:cut], logprobs=parent.logprobs[:cut],
                entropies=parent.entropies[:cut], images=parent.images[:len(spans)],
                image_spans=list(spans), pixel_values=parent.pixel_values[:len(spans)],
                tool_calls=[c for c in parent.tool_calls if c.end <= cut],
                turns=sum(1 for c in parent.tool_calls if c.end <= cut),
                parent_uid=parent.uid, cut=cut, branch_set=branch_set, seq_id=seq)
            if force_tool_call:
                t.append([self.fmt.tool_call], sampled=train_forced)
            out.append(t)
        return out

    def release(self, trajs: list[Trajectory]) -> None:
        for t in trajs:
            if t.seq_id is not None:
                self.engine.free(t.seq_id)
                t.seq_id = None

    def run(self, trajs: list[Trajectory], samples: dict, *, step: int = 0) -> None:
        """Advance trajectories turn by turn until every one has finished or hit a limit."""
        active = [t for t in trajs if not (t.finished or t.truncated)]
        while active:
            params = []
            for t in active:
                budget = self.cfg.max_total_tokens - len(t.tokens)
                params.append(SamplingParams(
                    temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                    max_tokens=max(1, min(self.cfg.max_turn_tokens, budget)),
                    stop_token_ids=self.fmt.stop_ids, banned_token_ids=self.fmt.banned_ids,
                    seed=_seed(self.seed, step, t.uid, t.turns)))
            outs = self.engine.generate([t.seq_id for t in active], params)
            still, responses = [], []
            for t, out in zip(active, outs):
                turn_start = len(t.tokens)
                t.append(out.token_ids, sampled=True, logprobs=out.logprobs, entropies=out.entropies)
                t.turns += 1
                more = self._after_turn(t, turn_start, out.finish_reason, samples[t.uid])
                if more is not None:
                    still.append(t)
                    responses.append(more)
            # Every continuing trajectory's tool response in packed prefill forwards.
            self._extend_many([t.seq_id for t in still], responses)
            active = still

    # -- internals --------------------------------------------------------------------------

    def _schemas(self, sample) -> list[dict]:
        # A row's `tools` is exactly what it is offered: None = every tool of the run, [] = none.
        return self._tools_for(sample).schemas()

    def _tools_for(self, sample) -> ToolRegistry:
        """The registry of the tools this sample is offered: a call to any other tool is an
        `unknown_tool` error the model reads, as if the tool did not exist."""
        names = getattr(sample, "tools", None)
        if names is None:
            return self.tools
        key = tuple(names)
        if key not in self._subsets:
            self._subsets[key] = self.tools.subset(list(names))
        return self._subsets[key]

    def _add_many(self, chunks: list[Chunk]) -> list[int]:
        add_many = getattr(self.engine, "add_many", None)    # an engine without it: one by one
        if add_many is None:
            return [self.engine.add(c.ids, **self._mm(c)) for c in chunks]
        return add_many([c.ids for c in chunks], [self._mm(c) for c in chunks])

    def _extend_many(self, seq_ids: list[int], chunks: list[Chunk]) -> None:
        extend_many = getattr(self.engine, "extend_many", None)
        if extend_many is None:
            for s, c in zip(seq_ids, chunks):
                self.engine.extend(s, c.ids, **self._mm(c))
        elif seq_ids:
            extend_many(seq_ids, [c.ids for c in chunks], [self._mm(c) for c in chunks])

    @staticmethod
    def _mm(chunk: Chunk) -> dict:
        if not chunk.pixel_values:
            return {}
        import torch

        return {"pixel_values": torch.cat(chunk.pixel_values, 0),
                "image_grid_thw": torch.tensor(chunk.grids, dtype=torch.long)}

    def _append(self, t: Trajectory, chunk: Chunk, *, from_tool: bool) -> None:
        base = len(t.tokens)
        t.append(chunk.ids, sampled=False)
        for (s, e), grid, pv in zip(chunk.pad_spans, chunk.grids, chunk.pixel_values):
            t.image_spans.append(ImageSpan(base + s, base + e, grid, from_tool))
            t.pixel_values.append(pv)

    def _after_turn(self, t: Trajectory, turn_start: int, finish_reason: str, sample) -> Chunk | None:
        """Handle the end of a turn: run its tool call and append the response to the trajectory.
        Returns the response chunk for the engine if the trajectory continues (the caller
        prefills it), else None."""
        turn = t.tokens[turn_start:]
        last = turn[-1] if turn else None
        if finish_reason == "stop" and last == self.fmt.im_end:
            t.finished = True
            t.final_text = self.fmt.decode(turn)
            return None
        if finish_reason != "stop" or last != self.fmt.tool_call_end:
            # Out of tokens mid-turn: flagged so the loss can mask it rather than penalise it.
            t.truncated = True
            t.final_text = self.fmt.decode(turn)
            return None
        # A tool call closed. Its opening is in this turn, or is the forced "<tool_call>" of an
        # AXPO branch just before it (the token before a turn is otherwise never <tool_call>).
        lo = max(t.prompt_len, turn_start - 1)
        rel, call_text = self.fmt.call_text(t.tokens[lo:])
        start = lo + rel if rel is not None else turn_start
        if rel is None:
            call_text = "<missing <tool_call> opening>" + call_text
        call, result = self._tools_for(sample).execute(call_text, ToolContext(images=list(t.images), sample=sample))
        if rel is None and result.error is None:
            result.error = "bad_format"
        t.tool_calls.append(ToolCallRecord(
            start=start, end=len(t.tokens), name=call.name if call else None,
            arguments=call.arguments if call else None, error=result.error))
        if t.turns >= self.cfg.max_turns:
            t.truncated = True
            return None
        chunk = self.fmt.tool_response(result.text, result.images)
        if len(t.tokens) + len(chunk.ids) + 1 > self.cfg.max_total_tokens:
            t.truncated = True
            return None
        self._append(t, chunk, from_tool=True)
        t.images.extend(result.images)
        return chunk
