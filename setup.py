"""Build script: the Python packages plus the optional pybind11 extension `axpo._C` from csrc/.

The extension (the KV block manager) is optional at build time and at run time, as in flash-attn:
set AXPO_NO_EXT=1 to skip it; `axpo.rollout.block_manager` then falls back to a pure-Python
implementation with the same interface and warns once.
"""

import glob
import os

from setuptools import find_packages, setup

packages = find_packages(include=["axpo", "axpo.*"])
# kernels/ is shipped as axpo.kernels (see package-dir in pyproject.toml).
packages += ["axpo.kernels"] + [
    "axpo.kernels." + p for p in find_packages(where="kernels")
]

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob("csrc/*.cpp"))
if os.environ.get("AXPO_NO_EXT", "0") != "1" and sources:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension(
            "axpo._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )
    cmdclass["build_ext"] = build_ext

setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
