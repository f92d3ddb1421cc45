"""AXPO fused ops (imported as `axpo.kernels`; the folder is `kernels/` at the repository root).

Public API:
    logprob_entropy, linear_logprob_entropy   - log-prob of the sampled token + entropy
    group_advantages, clipped_policy_loss,    - group-relative advantages and the clipped
    grouped_policy_loss                         policy loss, separate and fused
    linear_policy_loss                        - fused LM head + clipped policy loss (3 GEMMs,
                                                gradients computed in the forward)
    swiglu_down, rms_norm                     - the decoder's MLP tail and RMSNorm saving fewer
                                                activations for backward (plain PyTorch
                                                autograd Functions, recompute in backward)

CUDA tensors run the Triton kernels, other tensors a chunked PyTorch path;
`AXPO_KERNEL_BACKEND=triton|torch|auto` forces either (see dispatch.py). The plain PyTorch
references live in `axpo.kernels.reference`.

Every op is a torch.library custom op (namespace `axpo`, e.g. `torch.ops.axpo.logprob_entropy_fwd`)
with a fake implementation and registered autograd, so the public functions trace under
FakeTensorMode (any device) and torch.compile(fullgraph=True) without graph breaks.
`swiglu_down` and `rms_norm` are the exception: plain `torch.autograd.Function`s of aten ops
(nothing to hide from the tracer), which trace as they are.
"""

if __name__ != "axpo.kernels":
    # Imported under another name, i.e. as a bare top-level `kernels` because this checkout's root
    # is on sys.path (`python -m axpo.eval` or `python -m pytest` run from the root, a script that
    # puts the root first). Two things must hold then:
    # - The ops must not be registered again: torch would replace the `axpo::` ops by name
    #   (custom_op overwrites), leaving the handles axpo.kernels holds dangling
    #   ("schema_.has_value() INTERNAL ASSERT FAILED", std::bad_alloc or a segfault later).
    # - `kernels` must still mean Hugging Face's package of that name where it is installed:
    #   transformers >= 5.2x depends on it and runs `from kernels import CUDAProperties, ...` as
    #   soon as its activations module loads, which failed from the repository root.
    # So the name is handed to the installed package found on sys.path without this checkout
    # (the import system returns whatever sys.modules holds for the name after this runs), and
    # where there is none it stays an empty module with no submodules and no version
    # (transformers then reports the package as unavailable).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None and _spec.loader is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
    else:
        __path__ = []
        __all__ = []
else:
    from .dispatch import HAS_TRITON, backend_for
    from .linear_logprob_entropy import linear_logprob_entropy
    from .linear_policy_loss import linear_policy_loss
    from .logprob_entropy import logprob_entropy
    from .policy_loss import clipped_policy_loss, group_advantages, grouped_policy_loss
    from .rmsnorm import rms_norm
    from .swiglu import swiglu_down

    __all__ = [
        "logprob_entropy",
        "linear_logprob_entropy",
        "group_advantages",
        "clipped_policy_loss",
        "grouped_policy_loss",
        "linear_policy_loss",
        "swiglu_down",
        "rms_norm",
        "backend_for",
        "HAS_TRITON",
    ]
