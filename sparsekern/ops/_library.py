"""Every schema of the ``sparsekern`` op namespace, defined once.

C++ adds implementations per dispatch key (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); Python adds fake
(meta) implementations and autograd in ``sparsekern/ops/<op>.py``; Triton kernels are separate
``torch.library.triton_op`` ops named ``<op>_triton`` (see ``sparsekern/kernels``).
"""

import torch

lib = torch.library.Library("sparsekern", "DEF")

# 2:4 (fp32: 1:2) compression to the CUTLASS semi-structured layout; see ops/semi24_compress.py.
lib.define("semi24_compress(Tensor dense) -> (Tensor packed, Tensor meta)")
lib.define("semi24_decompress(Tensor packed, Tensor meta) -> Tensor")
