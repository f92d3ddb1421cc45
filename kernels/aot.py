"""Ahead-of-time compilation of every Triton kernel for sm_80 / sm_90, with ptxas register counts.

Runs without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` lowers to
PTX on any machine; the compiled object only exposes `n_regs` / `n_spills` after it is loaded on a
device, so the PTX is assembled again with Triton's bundled `ptxas -v` and its report parsed.
Must run in a process where TRITON_INTERPRET was *not* set before triton was imported (the
kernels would then be interpreter objects).

    python -m axpo.kernels.aot          # prints the table
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .dispatch import HAS_TRITON

# importlib, not `from . import logprob_entropy`: the package re-exports functions of the same name.
lpe = importlib.import_module(".logprob_entropy", __package__)
pl = importlib.import_module(".policy_loss", __package__)

TARGETS = (80, 90)


@dataclass
class KernelSpec:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int


def kernel_specs():
    """Every kernel at its default launch settings (tile sizes, warps), in the dtypes we ship."""
    specs = []
    for dt in ("fp32", "bf16"):
        specs.append(KernelSpec(
            f"lpe_fwd[{dt}]", lpe._lpe_fwd_kernel,
            {"x_ptr": f"*{dt}", "stride_outer": "i64", "stride_inner": "i64", "inner": "i64",
             "tgt_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32", "m_ptr": "*fp32",
             "ls_ptr": "*fp32", "md_ptr": "*fp32", "V": "i32", "inv_t": "fp32",
             "HAS_ENT": "constexpr", "BLOCK_V": "constexpr"},
            {"HAS_ENT": True, "BLOCK_V": lpe.FWD_BLOCK_V}, lpe.FWD_NUM_WARPS,
        ))
        specs.append(KernelSpec(
            f"lpe_bwd[{dt}]", lpe._lpe_bwd_kernel,
            {"x_ptr": f"*{dt}", "stride_outer": "i64", "stride_inner": "i64", "inner": "i64",
             "tgt_ptr": "*i64", "m_ptr": "*fp32", "ls_ptr": "*fp32", "md_ptr": "*fp32", "glp_ptr": "*fp32",
             "gent_ptr": "*fp32", "out_ptr": f"*{dt}", "out_stride": "i64", "V": "i32", "inv_t": "fp32",
             "HAS_GLP": "constexpr", "HAS_GENT": "constexpr", "BLOCK_V": "constexpr"},
            {"HAS_GLP": True, "HAS_GENT": True, "BLOCK_V": lpe.BWD_BLOCK_V}, lpe.BWD_NUM_WARPS,
        ))
    # the common training variants: no entropy (old/ref log-probs), gradient through logp only
    specs.append(KernelSpec(
        "lpe_fwd[bf16,no entropy]", lpe._lpe_fwd_kernel, dict(specs[2].signature),
        {"HAS_ENT": False, "BLOCK_V": lpe.FWD_BLOCK_V}, lpe.FWD_NUM_WARPS,
    ))
    specs.append(KernelSpec(
        "lpe_bwd[bf16,logp only]", lpe._lpe_bwd_kernel, dict(specs[3].signature),
        {"HAS_GLP": True, "HAS_GENT": False, "BLOCK_V": lpe.BWD_BLOCK_V}, lpe.BWD_NUM_WARPS,
    ))
    specs.append(KernelSpec(
        "segment_stats", pl._segment_stats_kernel,
        {"r_ptr": "*fp32", "order_ptr": "*i64", "start_ptr": "*i64", "count_ptr": "*i64",
         "mean_ptr": "*fp32", "std_ptr": "*fp32", "scale_ptr": "*fp32", "eps": "fp32",
         "GRPO": "constexpr", "BLOCK": "constexpr"},
        {"GRPO": True, "BLOCK": pl.SEG_BLOCK}, 4,
    ))
    specs.append(KernelSpec(
        "group_adv", pl._group_adv_kernel,
        {"r_ptr": "*fp32", "seg_ptr": "*i64", "mean_ptr": "*fp32", "scale_ptr": "*fp32",
         "out_ptr": "*fp32", "S": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 1024}, 4,
    ))
    loss_sig = {"logp_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "adv_ptr": "*fp32",
                "rew_ptr": "*fp32", "seg_ptr": "*i64", "mean_ptr": "*fp32", "scale_ptr": "*fp32",
                "mask_ptr": "*u8", "row_scale_ptr": "*fp32", "dlogp_ptr": "*fp32", "part_ptr": "*fp32",
                "n": "i32", "T": "i32", "clip_low": "fp32", "clip_high": "fp32", "beta": "fp32",
                "ADV_PER_TOKEN": "constexpr", "FUSED_ADV": "constexpr", "HAS_REF": "constexpr",
                "BLOCK": "constexpr"}
    for label, per_tok, fused in (("seq_adv", False, False), ("token_adv", True, False), ("fused_adv", False, True)):
        specs.append(KernelSpec(
            f"policy_loss[{label}+kl]", pl._policy_loss_kernel, dict(loss_sig),
            {"ADV_PER_TOKEN": per_tok, "FUSED_ADV": fused, "HAS_REF": True, "BLOCK": pl.LOSS_BLOCK},
            pl.LOSS_NUM_WARPS,
        ))
    return specs


def ptxas_path(cc: int = 90):
    """The ptxas Triton itself uses for compute capability `cc`.

    Triton 3.9 ships two: `bin/ptxas` (CUDA 12.9, used below sm_90) and `bin/ptxas-blackwell`
    (CUDA 13.x, used from sm_90 on; the PTX it emits for sm_90a is version 9.x, which the older
    one rejects). Ask Triton's backend which one, and fall back to the wheel's files.
    """
    if not HAS_TRITON:
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        p = get_ptxas(cc).path
        if p and os.path.exists(p):
            return p
    except Exception:
        pass
    import triton

    name = "ptxas" if cc < 90 else "ptxas-blackwell"
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return p if os.path.exists(p) else None


def compile_ptx(spec: KernelSpec, cc: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    # enable_fp_fusion stated explicitly (it is the Triton 3.9 runtime default; unset, it warns).
    opts = {"num_warps": spec.num_warps, "enable_fp_fusion": True}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    return compiled.asm["ptx"]


def ptxas_report(ptx: str, ptxas: str):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on this PTX."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    out = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stores, loads = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return regs, stores, loads, arch


def aot_table(targets=TARGETS):
    rows = []
    for spec in kernel_specs():
        for cc in targets:
            ptxas = ptxas_path(cc)
            if ptxas is None:
                raise FileNotFoundError(f"no ptxas for sm_{cc} in the triton wheel")
            regs, st, ld, arch = ptxas_report(compile_ptx(spec, cc), ptxas)
            rows.append({"kernel": spec.name, "target": arch, "num_warps": spec.num_warps,
                         "registers": regs, "spill_stores": st, "spill_loads": ld})
    return rows


def format_table(rows):
    lines = [f"{'kernel':28s} {'target':8s} {'warps':>5s} {'regs':>5s} {'spill st/ld (B)':>16s}"]
    for r in rows:
        lines.append(f"{r['kernel']:28s} {r['target']:8s} {r['num_warps']:5d} {r['registers']:5d} "
                     f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>16s}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(aot_table()))
