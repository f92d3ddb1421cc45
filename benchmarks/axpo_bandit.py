"""An analytic miniature of AXPO's argument: when does resampling tool calls from failed prefixes
prevent tool collapse, and when can it not?

The agent, reduced to two tokens per rollout:
- a tool decision, {answer directly, call the tool}: P(call | q) = sigmoid(b + u_q), a shared
  "tool habit" b plus a per-question table u;
- if it calls, an M-way tool argument (which slot to open): softmax(theta_q), a per-question table
  whose right slot (slot 0 for every question; the wrong slots start symmetric, so which slot is
  right does not matter) starts with probability `skill`. There is deliberately no shared
  "skill" parameter: one would get a consistently signed gradient from every failed call (pushing
  a wrong slot down raises the right one through it) and Adam would turn that into full-size
  steps, so the argument would be learned from failures alone, which a large model's argument
  space (many ways to be wrong) does not allow.
Outcomes: a right call gives the right answer with prob `p_hit` (0.95), a wrong call misleads
(right with prob `p_wrong`, 0), a direct answer is a guess among C choices (1/C = 0.25). The
initial argument skill p(right slot) is swept; P(call) starts at `p_call0` (0.5).

Training, per step: B questions x G rollouts, binary reward, GRPO advantages (group mean, Bessel
std, as `axpo.kernels.group_advantages`), token-mean surrogate over the decision and argument
tokens of the whole batch (on-policy, one update: the clipped surrogate's gradient at ratio 1),
Adam on the tables. Arms:
- grpo: G = 8.
- grpo_2x: G = 16 (100% extra rollouts).
- brute_force: when every tool-using rollout of a group failed (AXPO's trigger), K extra *full*
  rollouts per selected slot, allocated as AXPO allocates prefixes (budget `extra_fraction` = 25%
  of the base rollouts, at most `per_group` slots per group, highest decision entropy first).
- axpo: the same trigger, budget and allocation, but each slot is a failed tool-using rollout's
  frozen decision ("call", the prefix) with K resampled arguments; soft credit as the trainer's
  default (branches join the group, advantages over the enlarged group, the prefix token trained
  in every branch: `algo.prefix_weight=per_sequence`).
- axpo_once: axpo with `algo.prefix_weight=once` (the parent's and its K branches' copies of the
  decision token weigh 1/(K+1) each).
The trainer's candidate prefixes are distinct tool-thinks; here every failed tool user's prefix is
the same one token, so candidates are not deduplicated (each failed tool user is a candidate).

Final accuracy and tool-use rate are exact expectations under the final policy (no sampling
noise), averaged over the questions; mean and standard error over seeds.

    python benchmarks/axpo_bandit.py                      # full sweep -> benchmarks/results/axpo_bandit*
    python benchmarks/axpo_bandit.py --seeds 4 --steps 40 --skills 0 1 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ("grpo", "grpo_2x", "brute_force", "axpo", "axpo_once")


@dataclass
class Bandit:
    questions: int = 32          # N
    batch: int = 8               # B questions per step
    group: int = 8               # G rollouts per question
    slots: int = 64              # M argument values
    choices: int = 4             # C: a direct answer is right with prob 1/C
    p_hit: float = 0.95          # right call -> right answer
    p_wrong: float = 0.0         # wrong call -> right answer (misled)
    p_call0: float = 0.5         # initial P(call)
    steps: int = 300
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    branches: int = 4            # K
    per_group: int = 2           # prefixes (slots) per triggered group
    extra_fraction: float = 0.25
    curve_every: int = 10


@dataclass
class Adam:
    lr: float
    betas: tuple[float, float]
    eps: float
    t: int = 0
    state: dict = field(default_factory=dict)

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        b1, b2 = self.betas
        for k, g in grads.items():
            m, v = self.state.get(k, (np.zeros_like(g), np.zeros_like(g)))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            self.state[k] = (m, v)
            mh, vh = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            params[k] -= self.lr * mh / (np.sqrt(vh) + self.eps)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _logit_right(skill: float, m: int) -> float:
    """x such that softmax([x, 0, ..., 0])[0] = skill."""
    if skill <= 0:
        return -math.inf
    skill = min(skill, 1 - 1e-12)
    return math.log(skill * (m - 1) / (1 - skill))


class Policy:
    def __init__(self, cfg: Bandit, skill: float, seeds: int):
        S, N, M = seeds, cfg.questions, cfg.slots
        self.cfg = cfg
        self.p = {"b": np.full(S, math.log(cfg.p_call0 / (1 - cfg.p_call0))), "u": np.zeros((S, N)),
                  "theta": np.zeros((S, N, M))}
        self.p["theta"][:, :, 0] = _logit_right(skill, M)
        self.opt = Adam(cfg.lr, cfg.betas, cfg.eps)

    def p_call(self):                      # [S, N]
        return _sigmoid(self.p["b"][:, None] + self.p["u"])

    def p_slot(self):                      # [S, N, M]
        return _softmax(self.p["theta"])

    def accuracy(self):
        c, cfg = self.p_call(), self.cfg
        right = self.p_slot()[:, :, 0]
        return (c * (right * cfg.p_hit + (1 - right) * cfg.p_wrong) + (1 - c) / cfg.choices).mean(1)


def _sample_slots(rng, probs, n):
    """probs [S, B, M] -> n slots per (s, b) row, [S, B, n] (inverse CDF)."""
    cdf = np.cumsum(probs, -1)
    u = rng.random(probs.shape[:-1] + (n, 1))
    return np.minimum((u > cdf[:, :, None, :]).sum(-1), probs.shape[-1] - 1)


def _outcome(rng, call, slot, cfg):
    p = np.where(call, np.where(slot == 0, cfg.p_hit, cfg.p_wrong), 1.0 / cfg.choices)
    return (rng.random(call.shape) < p).astype(np.float64)


def _entropy2(p):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def _allocate(triggered, n_cand, score, slots, per_group):
    """AXPO's selection: per group min(candidates, per_group) prefixes, then the batch budget
    `slots`, highest score first (ties in group order). Returns prefixes per group [S, B]."""
    cap = np.where(triggered, np.minimum(n_cand, per_group), 0)
    order = np.argsort(-score, axis=1, kind="stable")
    cap_sorted = np.take_along_axis(cap, order, 1)
    before = np.cumsum(cap_sorted, 1) - cap_sorted
    n_sorted = np.clip(slots - before, 0, cap_sorted)
    out = np.zeros_like(cap)
    np.put_along_axis(out, order, n_sorted, 1)
    return out


def token_mean_grads(pc_q, ps_q, q, n_questions, calls, slots, adv, dec_w, arg_w) -> dict:
    """Gradient of the token-mean surrogate  -sum(w * A * log pi(token)) / sum(w)  (per seed, over
    the decision token of every rollout and the argument token of every call) w.r.t. the tables.
    Shapes: pc_q [S, B], ps_q [S, B, M], q [S, B] question ids, the rest [S, B, R]."""
    S, B = q.shape
    ntok = (dec_w.sum((1, 2)) + arg_w.sum((1, 2)))[:, None, None]
    coef_dec = -(dec_w * adv) / ntok                                      # d loss / d log pi(decision)
    coef_arg = -(arg_w * adv) / ntok
    # Decision: d log pi / dz = c - sigmoid(z), z = b + u_q.
    gz = coef_dec * (calls - pc_q[..., None])
    grads = {"b": gz.sum((1, 2)), "u": np.zeros((S, n_questions))}
    np.add.at(grads["u"], (np.broadcast_to(np.arange(S)[:, None], q.shape), q), gz.sum(-1))
    # Argument: d log pi(a) / d theta_q = onehot(a) - pi_q.
    g_theta_q = -coef_arg.sum(-1)[..., None] * ps_q                       # [S, B, M]
    np.add.at(g_theta_q, (np.arange(S)[:, None, None], np.arange(B)[None, :, None], slots), coef_arg)
    grads["theta"] = np.zeros((S, n_questions, ps_q.shape[-1]))
    np.add.at(grads["theta"], (np.arange(S)[:, None], q), g_theta_q)
    return grads


def run_arm(arm: str, skill: float, seeds: int, cfg: Bandit, seed: int = 0) -> dict:
    """Train `seeds` independent policies (vectorised) with one arm; final metrics per seed."""
    rng = np.random.default_rng([seed, int(round(skill * 1e6))])
    pol = Policy(cfg, skill, seeds)
    S, N, B, K = seeds, cfg.questions, cfg.batch, cfg.branches
    G = cfg.group * (2 if arm == "grpo_2x" else 1)
    E = cfg.per_group * K if arm in ("brute_force", "axpo", "axpo_once") else 0
    slots_budget = int(cfg.extra_fraction * B * cfg.group) // K
    counts = {"triggered": 0, "groups": 0, "extra": 0, "extra_success": 0, "base": 0}
    curve = []
    for step in range(cfg.steps):
        pc, ps = pol.p_call(), pol.p_slot()
        q = np.argsort(rng.random((S, N)), 1)[:, :B]                        # [S, B]
        pc_q = np.take_along_axis(pc, q, 1)                                  # [S, B]
        ps_q = ps[np.arange(S)[:, None], q]                                  # [S, B, M]
        call = rng.random((S, B, G)) < pc_q[..., None]
        slot = _sample_slots(rng, ps_q, G)
        r = _outcome(rng, call, slot, cfg)
        counts["base"] += call.size
        # Extra rollouts: [S, B, E], valid where e < K * prefixes of the group.
        e_call = np.zeros((S, B, E), bool)
        e_slot = np.zeros((S, B, E), int)
        e_r = np.zeros((S, B, E))
        e_valid = np.zeros((S, B, E), bool)
        parent_w = np.ones((S, B, G))                                         # base decision weights
        e_dec_w = np.ones((S, B, E))
        if E:
            tool_fail = call & (r <= 0)
            triggered = call.any(-1) & ~(call & (r > 0)).any(-1)
            n_pref = _allocate(triggered, tool_fail.sum(-1), _entropy2(pc_q), slots_budget, cfg.per_group)
            counts["triggered"] += int(triggered.sum())
            e_valid = np.arange(E)[None, None, :] < (K * n_pref)[..., None]
            e_slot = _sample_slots(rng, ps_q, E)
            if arm == "brute_force":
                e_call = rng.random((S, B, E)) < pc_q[..., None]
            else:                                                             # frozen "call" prefix
                e_call = np.ones((S, B, E), bool)
                if arm == "axpo_once":
                    # Parents: the first n_pref failed tool users of the group.
                    rank_fail = np.cumsum(tool_fail, -1) - 1
                    is_parent = tool_fail & (rank_fail < n_pref[..., None])
                    parent_w = np.where(is_parent, 1.0 / (K + 1), 1.0)
                    e_dec_w = np.full((S, B, E), 1.0 / (K + 1))
            e_r = _outcome(rng, e_call, e_slot, cfg) * e_valid
            counts["extra"] += int(e_valid.sum())
            counts["extra_success"] += int((e_r * e_valid).sum())
        counts["groups"] += S * B
        # GRPO advantages over the (enlarged) group.
        allr = np.concatenate([r, e_r], -1)
        valid = np.concatenate([np.ones_like(r, bool), e_valid], -1)
        n = valid.sum(-1, keepdims=True)
        mean = (allr * valid).sum(-1, keepdims=True) / n
        var = (((allr - mean) ** 2) * valid).sum(-1, keepdims=True) / np.maximum(n - 1, 1)
        adv = (allr - mean) / (np.sqrt(var) + 1e-6) * valid
        a_base, a_ext = adv[..., :G], adv[..., G:]
        # Token weights: decision token of every rollout, argument token of every call.
        dec_w = np.concatenate([parent_w, e_dec_w * e_valid], -1)
        arg_w = np.concatenate([call, e_call & e_valid], -1).astype(float)
        calls = np.concatenate([call, e_call], -1)
        slots_all = np.concatenate([slot, e_slot], -1)
        grads = token_mean_grads(pc_q, ps_q, q, N, calls, slots_all, adv, dec_w, arg_w)
        pol.opt.step(pol.p, grads)
        if step % cfg.curve_every == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "accuracy": float(pol.accuracy().mean()),
                          "tool_use": float(pol.p_call().mean())})
    return {"accuracy": pol.accuracy(), "tool_use": pol.p_call().mean(1),
            "skill": pol.p_slot()[:, :, 0].mean(1), "curve": curve,
            "trigger_rate": counts["triggered"] / max(1, counts["groups"]),
            "extra_share": counts["extra"] / max(1, counts["base"]),
            "resample_success": (counts["extra_success"] / counts["extra"]) if counts["extra"] else math.nan}


def _ms(x):
    x = np.asarray(x, float)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def sweep(skills, arms, seeds, cfg, seed=0) -> dict:
    res = {}
    for sk in skills:
        for arm in arms:
            out = run_arm(arm, sk, seeds, cfg, seed)
            out["curve"] = [{k: round(v, 4) for k, v in c.items()} for c in out["curve"]]
            res[(sk, arm)] = {
                "accuracy": _ms(out["accuracy"]), "tool_use": _ms(out["tool_use"]), "final_skill": _ms(out["skill"]),
                "trigger_rate": out["trigger_rate"], "extra_share": out["extra_share"],
                "resample_success": out["resample_success"], "curve": out["curve"]}
    return res


def write(res, skills, arms, seeds, cfg, out_dir: Path, name: str, argv, wall: float) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    start_acc = {sk: Policy(cfg, sk, 1).accuracy()[0] for sk in skills}
    lines = [
        "# AXPO bandit: an analytic miniature", "",
        f"Command: `python benchmarks/axpo_bandit.py {' '.join(argv)}` ({wall:.1f} s).  ",
        f"{seeds} seeds per cell; mean ± standard error over seeds. Final values are exact expectations "
        "under the final policy. Setup: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()) + ".", "",
        "Direct answer = 1/C = %.2f; a right call = %.2f. Extra rollouts per step: grpo 0, grpo_2x 100%%, "
        "brute_force / axpo up to %d%% (measured share in the last table)." % (
            1 / cfg.choices, cfg.p_hit, round(100 * cfg.extra_fraction)), "",
        "## Final accuracy", "", "| skill p(right slot) | start | " + " | ".join(arms) + " |",
        "|---" * (len(arms) + 2) + "|"]
    for sk in skills:
        lines.append(f"| {sk:g} | {start_acc[sk]:.3f} | " + " | ".join(
            "%.3f ± %.3f" % res[(sk, a)]["accuracy"] for a in arms) + " |")
    lines += ["", f"## Final tool-use rate (start {cfg.p_call0:g})", "",
              "| skill | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for sk in skills:
        lines.append(f"| {sk:g} | " + " | ".join("%.3f ± %.3f" % res[(sk, a)]["tool_use"] for a in arms) + " |")
    lines += ["", "## Final argument skill p(right slot)", "",
              "| skill | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for sk in skills:
        lines.append(f"| {sk:g} | " + " | ".join("%.3f ± %.3f" % res[(sk, a)]["final_skill"] for a in arms) + " |")
    ex = [a for a in arms if a in ("brute_force", "axpo", "axpo_once")]
    if ex:
        lines += ["", "## Extra rollouts: trigger rate / extra share / success rate of extra rollouts", "",
                  "| skill | " + " | ".join(ex) + " |", "|---" * (len(ex) + 1) + "|"]
        for sk in skills:
            lines.append(f"| {sk:g} | " + " | ".join(
                "%.2f / %.3f / %.3f" % (res[(sk, a)]["trigger_rate"], res[(sk, a)]["extra_share"],
                                        res[(sk, a)]["resample_success"]) for a in ex) + " |")
    pairs = [(x, y) for x, y in (("axpo", "grpo"), ("axpo", "brute_force"), ("axpo", "grpo_2x"),
                                  ("axpo_once", "grpo"), ("axpo_once", "axpo")) if x in arms and y in arms]
    if pairs:
        lines += ["", "## Differences in final accuracy (mean ± s.e. of the difference; * = beyond 2 s.e. and "
                  "at least 0.005)", "",
                  "| skill | " + " | ".join(f"{x} - {y}" for x, y in pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
        for sk in skills:
            cells = []
            for x, y in pairs:
                (mx, ex_), (my, ey) = res[(sk, x)]["accuracy"], res[(sk, y)]["accuracy"]
                d, e = mx - my, math.hypot(ex_, ey)
                cells.append(f"{d:+.3f} ± {e:.3f}{' *' if abs(d) > 2 * e and abs(d) >= 0.005 else ''}")
            lines.append(f"| {sk:g} | " + " | ".join(cells) + " |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps({"config": asdict(cfg), "seeds": seeds, "argv": argv, "wall_s": wall, "results": [
        {"init_skill": sk, "arm": a, **res[(sk, a)]} for sk in skills for a in arms]},
        indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, a in enumerate(arms):
        color = f"C{i}"
        for ax, key in zip(axes, ("accuracy", "tool_use")):
            m = [res[(sk, a)][key][0] for sk in skills]
            e = [res[(sk, a)][key][1] for sk in skills]
            ax.errorbar(skills, m, yerr=e, marker="o", ms=4, capsize=2, label=a, color=color)
        if a in ("brute_force", "axpo", "axpo_once"):
            axes[2].plot(skills, [res[(sk, a)]["resample_success"] for sk in skills], marker="o", ms=4,
                         label=a, color=color)
    axes[0].plot(skills, [start_acc[sk] for sk in skills], "k:", label="start")
    axes[0].axhline(1 / cfg.choices, color="grey", lw=0.8, ls="--")
    axes[2].legend(fontsize=8)
    for ax, key in zip(axes, ("final accuracy", "final tool-use rate", "success rate of extra rollouts")):
        ax.set_xscale("symlog", linthresh=0.02)
        ax.set_xlim(-0.002, 1.15)
        ax.set_xlabel("initial argument skill p(right slot)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"AXPO bandit: {cfg.steps} steps, {seeds} seeds (mean ± s.e.)")
    fig.tight_layout()
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [md, js, png]


def main(argv=None) -> list[Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skills", type=float, nargs="+",
                    default=[0.0, 0.02, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--steps", type=int, default=Bandit.steps)
    ap.add_argument("--lr", type=float, default=Bandit.lr)
    ap.add_argument("--slots", type=int, default=Bandit.slots)
    ap.add_argument("--p-call0", type=float, default=Bandit.p_call0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="axpo_bandit")
    a = ap.parse_args(argv)
    cfg = Bandit(steps=a.steps, lr=a.lr, p_call0=a.p_call0, slots=a.slots)
    t0 = time.time()
    res = sweep(a.skills, a.arms, a.seeds, cfg, a.seed)
    paths = write(res, a.skills, a.arms, a.seeds, cfg, a.out, a.name, argv, time.time() - t0)
    print((a.out / f"{a.name}.md").read_text())
    return paths


if __name__ == "__main__":
    main()
