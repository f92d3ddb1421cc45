"""Credit assignment: per-token advantages and loss weights for base rollouts and AXPO branches.

- soft (default): each branch is an ordinary sequence of its question's group (prefix tokens
  included); advantages are normalised over the enlarged group.
- subgroup: base rollouts are normalised against their group, branches against their siblings
  (same prefix), so a branch is judged only by how its tool call did from that prefix.
- tree: branch-specific tokens get the branch's (enlarged-group) advantage; the shared prefix is
  trained once more, on the first *trained* branch of the set, with the mean of the trained
  branches' advantages (times sqrt(n) with `tree_sqrt_weight`, n = trained branches: TreeRL's
  1/sqrt(leaves) weight per leaf occurrence, summed over the n leaves that share the prefix). The
  parent keeps its own sequence. If every branch of a set is masked, the set adds nothing.

Prefix weighting (`algo.prefix_weight`, soft and subgroup credit). The frozen prefix [prompt,
cut) of a branch set exists in K+1 copies: the parent and its K branches.
- "per_sequence" (default): every copy is an ordinary sequence, so the tool-think is trained K+1
  times; when the branches fail, the push against acting is K+1 times a single rollout's.
- "once": each prefix token is counted once per family: a token shared by c trained copies has
  loss weight 1/c in each (the parent's token j is shared with every trained branch cut after j).
  Its total gradient is then the mean of the copies' advantages times one token, and under
  token-mean aggregation it counts once in the denominator too (exact for token-mean; under
  seq-mean-token-mean the weights act within each sequence's mean).

Sequence-level statistics come from the fused `axpo.kernels.group_advantages`.
"""

from __future__ import annotations

import math

import torch

from axpo.agent.trajectory import Trajectory
from axpo.kernels import group_advantages

CREDITS = ("soft", "subgroup", "tree")
PREFIX_WEIGHTS = ("per_sequence", "once")


def sequence_advantages(trajs: list[Trajectory], *, credit: str, mode: str = "grpo",
                        trained: list[bool] | None = None) -> torch.Tensor:
    """One advantage per trajectory. Untrained ones (masked truncations) are left out of the
    statistics and get 0."""
    if credit not in CREDITS:
        raise ValueError(f"algo.credit: unknown mode {credit!r}; choose from {', '.join(CREDITS)}")
    trained = trained or [True] * len(trajs)
    idx = [i for i, k in enumerate(trained) if k]
    adv = torch.zeros(len(trajs), dtype=torch.float32)
    if not idx:
        return adv
    rewards = torch.tensor([trajs[i].reward for i in idx], dtype=torch.float32)
    groups = torch.tensor([trajs[i].group for i in idx], dtype=torch.long)
    sub = None
    if credit == "subgroup":
        sub = torch.tensor([0 if trajs[i].branch_set is None else 1 + trajs[i].branch_set for i in idx])
    adv[idx] = group_advantages(rewards, groups, subgroup_ids=sub, mode=mode)
    return adv


def _branch_sets(trajs: list[Trajectory]) -> dict[int, list[int]]:
    sets: dict[int, list[int]] = {}
    for i, t in enumerate(trajs):
        if t.branch_set is not None:
            sets.setdefault(t.branch_set, []).append(i)
    return sets


def _tree_prefix_owner(trajs: list[Trajectory], trained: list[bool]) -> dict[int, int]:
    """Branch set -> index of the branch that carries the set's prefix (its first trained one)."""
    out = {}
    for b, members in _branch_sets(trajs).items():
        kept = [i for i in members if trained[i]]
        if kept:
            out[b] = kept[0]
    return out


def token_advantages(trajs: list[Trajectory], seq_adv: torch.Tensor, *, credit: str,
                     tree_sqrt_weight: bool = False, trained: list[bool] | None = None
                     ) -> list[torch.Tensor]:
    """Per-token advantages (aligned with each trajectory's tokens; only loss-mask positions
    matter). For `tree`, the prefix of the first trained branch of a set carries the mean of the
    trained branches' advantages; the other copies are masked by `loss_masks`."""
    trained = trained or [True] * len(trajs)
    out = [torch.full((len(t.tokens),), float(a)) for t, a in zip(trajs, seq_adv.tolist())]
    if credit != "tree":
        return out
    sets = _branch_sets(trajs)
    for b, owner in _tree_prefix_owner(trajs, trained).items():
        kept = [i for i in sets[b] if trained[i]]
        mean = float(seq_adv[kept].mean())
        scale = math.sqrt(len(kept)) if tree_sqrt_weight else 1.0
        t = trajs[owner]
        out[owner][t.prompt_len:t.cut] = mean * scale
    return out


def _prefix_once_weights(trajs: list[Trajectory], trained: list[bool]) -> dict[int, torch.Tensor]:
    """Index -> per-token weight (1/copies on shared prefix positions, 1 elsewhere) for every
    member of a family (a parent and the branches cut from it)."""
    by_uid = {t.uid: i for i, t in enumerate(trajs)}
    families: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        if t.parent_uid is not None:
            families.setdefault(t.parent_uid, []).append(i)
    out = {}
    for parent_uid, branches in families.items():
        parent = by_uid.get(parent_uid)
        members = ([parent] if parent is not None else []) + branches
        span = max(trajs[i].cut for i in branches)
        # copies[j] = trained copies holding the parent's token j: the parent, and every trained
        # branch cut after j.
        copies = torch.zeros(span)
        if parent is not None and trained[parent]:
            copies += 1
        for i in branches:
            if trained[i]:
                copies[:trajs[i].cut] += 1
        for i in members:
            t = trajs[i]
            w = torch.ones(len(t.tokens))
            hi = span if i == parent else t.cut
            c = copies[:hi].clamp(min=1)
            w[:hi] = 1.0 / c
            out[i] = w
    return out


def loss_masks(trajs: list[Trajectory], *, credit: str, trained: list[bool],
               prefix_weight: str = "per_sequence") -> list[torch.Tensor]:
    """Per-token loss weights: sampled tokens of trained trajectories; under `tree` the shared
    prefix of a branch set only once more (on its first trained branch); with
    `prefix_weight="once"` (soft/subgroup) shared prefix tokens weighted 1/copies."""
    if prefix_weight not in PREFIX_WEIGHTS:
        raise ValueError(f"algo.prefix_weight: unknown mode {prefix_weight!r}; choose from "
                         f"{', '.join(PREFIX_WEIGHTS)}")
    if credit == "tree" and prefix_weight != "per_sequence":
        raise ValueError("algo.prefix_weight='once' applies to soft and subgroup credit; tree credit "
                         "has its own prefix rule (the branches' mean, once)")
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) * float(keep) for t, keep in zip(trajs, trained)]
    if credit == "tree":
        owners = _tree_prefix_owner(trajs, trained)
        for i, t in enumerate(trajs):
            if t.branch_set is not None and owners.get(t.branch_set) != i:
                masks[i][t.prompt_len:t.cut] = 0.0
    elif prefix_weight == "once":
        for i, w in _prefix_once_weights(trajs, trained).items():
            masks[i] = masks[i] * w
    return masks


def assign(trajs: list[Trajectory], cfg, trained: list[bool]
           ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The RL step's credit in one call (`cfg` is an `AlgoConfig`): sequence advantages,
    per-token advantages and per-token loss weights."""
    seq = sequence_advantages(trajs, credit=cfg.credit, mode=cfg.advantage, trained=trained)
    tok = token_advantages(trajs, seq, credit=cfg.credit, tree_sqrt_weight=cfg.tree_sqrt_weight,
                           trained=trained)
    masks = loss_masks(trajs, credit=cfg.credit, trained=trained, prefix_weight=cfg.prefix_weight)
    return seq, tok, masks
