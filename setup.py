"""Builds sparsekern._C from csrc/.

- The C++ CPU sources are always built.
- The CUDA sources are built whenever a CUDA toolkit and a CUDA build of torch are present, GPU or not,
  for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
- SPARSEKERN_BUILD_EXTENSION=0 gives a pure-Python install: every op then runs its plain-PyTorch reference
  and `sparsekern info` says why.
- SPARSEKERN_BUILD_CUDA=0 skips the CUDA sources even when a toolkit is found.

torch's own toolkit detection trusts `dirname(dirname(which nvcc))`, which is wrong when nvcc on PATH is a
wrapper script (as on our CI machines). When CUDA_HOME is unset we find the real root ourselves: the folder
that has bin/nvcc, include/cuda_runtime.h and lib64/libcudart.so.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _is_cuda_root(path: str) -> bool:
    return all(
        os.path.exists(os.path.join(path, part))
        for part in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so")
    )


def find_cuda_root() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if set, else the root nvcc itself reports."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc --dryrun prints '#$ TOP=<root>/bin/..' even when the nvcc on PATH is a wrapper script.
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match:
                candidates.append(os.path.normpath(match.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_cuda_root(path):
            return os.path.realpath(path)
    return None


def extensions():
    if not _flag("SPARSEKERN_BUILD_EXTENSION", True):
        print("sparsekern: SPARSEKERN_BUILD_EXTENSION=0, pure-Python install", file=sys.stderr)
        return [], {}

    cuda_root = find_cuda_root() if _flag("SPARSEKERN_BUILD_CUDA", True) else None
    if cuda_root:
        os.environ["CUDA_HOME"] = cuda_root  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # PTX: newer GPUs JIT it

    import torch
    from torch.utils import cpp_extension

    if cuda_root:
        cpp_extension.CUDA_HOME = cuda_root
    with_cuda = bool(cuda_root) and torch.version.cuda is not None
    if _flag("SPARSEKERN_BUILD_CUDA", True) and not with_cuda:
        why = "no CUDA toolkit found" if not cuda_root else f"torch {torch.__version__} is not a CUDA build"
        print(f"sparsekern: building without CUDA sources ({why})", file=sys.stderr)

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Runtime ISA dispatch is done per function (target_clones), so the baseline stays portable x86-64.
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch's headers need (BuildExtension adds it)
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        archs = "_".join(re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip()))
        define_macros += [
            ("SPARSEKERN_WITH_CUDA", "1"),
            ("SPARSEKERN_CUDA_ARCHS", archs),
            ("SPARSEKERN_CUDA_VERSION", torch.version.cuda),
        ]
        ext_cls = cpp_extension.CUDAExtension
        kwargs = {"extra_compile_args": {"cxx": cxx, "nvcc": nvcc}}
    else:
        ext_cls = cpp_extension.CppExtension
        kwargs = {"extra_compile_args": {"cxx": cxx}}
    ext = ext_cls(
        "sparsekern._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
        **kwargs,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it to check find_cuda_root
    ext_modules, cmdclass = extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    )
