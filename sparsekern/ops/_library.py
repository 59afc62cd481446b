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

# Masked sparse matmul (the sparse linear layer); see ops/spmm.py, ops/sddmm.py and ops/sparse_linear.py.
# W is (n_out, n_in) in CSR: row_ptr int64 (n_out + 1), col_idx int32 (nnz), values (nnz) in x's dtype.
# spmm: y = x @ W.T, y[b, o] = sum over j in row o of values[j] * x[b, col_idx[j]]; fp32 accumulation.
# The same op computes dX = g @ W through the transposed (CSC) index.
lib.define("spmm(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int n_out) -> Tensor")
# sddmm: the gradient of values, out[j] = sum over b of g[b, row(j)] * x[b, col_idx[j]] (only at the nonzeros).
lib.define("sddmm(Tensor g, Tensor x, Tensor row_ptr, Tensor col_idx) -> Tensor")
# The sparse linear layer's autograd op on the sparse path: y = x @ W.T + bias with W = (values, CSR/CSC index),
# forward by spmm, dX by spmm through the CSC, dvalues by sddmm. `backend` is a resolved kernel family. The
# dense path (scatter W, dense GEMM) is plain autograd in ops/sparse_linear.py, chosen per call by density.
lib.define(
    "sparse_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor csc_ptr, Tensor csc_row, "
    "Tensor csc_perm, Tensor? bias, int n_out, str backend) -> Tensor"
)
# The dense path's moves between a CSR weight's values and a dense (n_rows, n_cols) matrix; see ops/csr_dense.py.
# scatter_: dense[r, col_idx[j]] = values[j] for each nonzero j of row r, the rest of dense untouched; with a
# shadow (values of the previous scatter into this dense), only rows whose values changed are written, and the
# shadow becomes values. gather: values[j] = dense[r, col_idx[j]]. Bit-exact copies in any dtype.
lib.define(
    "csr_dense_scatter_(Tensor(a!) dense, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor(b!)? shadow=None) -> ()"
)
lib.define("csr_dense_gather(Tensor dense, Tensor row_ptr, Tensor col_idx) -> Tensor")

# Fused top-k over the outer product (RigL grow); see ops/outer_topk.py. x (B, n_in), g (B, n_out); the k largest
# |sum_b g[b, o] * x[b, i]| outside the CSR pattern (row_ptr int64 (n_out + 1), col_idx int32, columns ascending
# and unique per row), as flat indices o * n_in + i (int64) and scores (float32), by score descending, ties by
# ascending index. Never forms the (n_out, n_in) scores. fast=False: the exact scores (a rounded product and a
# rounded sum per batch row, the same bits on every backend); fast=True: the device's fastest arithmetic (fused
# multiply-adds on the CPU, tensor cores on the GPU), deterministic per backend, within a stated bound of float64.
lib.define(
    "outer_topk(Tensor x, Tensor g, int k, Tensor row_ptr, Tensor col_idx, bool fast=False) "
    "-> (Tensor index, Tensor score)"
)

# Constant fan-in (ELL) sparse matmul: every row of W (n_out, n_in) keeps the same number k of nonzeros, stored as
# cols int32 (n_out, k), ascending and unique per row, and values (n_out, k) in x's dtype (a CSR index whose rows
# all hold k entries, viewed as a matrix: no row_ptr). fp32 accumulation. See ops/ell_spmm.py, ops/ell_spmm_t.py,
# ops/ell_sddmm.py; SparseLinear takes these kernels when its rows are equal.
# ell_spmm: y (B, n_out), y[b, o] = sum_t values[o, t] * x[b, cols[o, t]].
lib.define("ell_spmm(Tensor x, Tensor cols, Tensor values) -> Tensor")
# ell_spmm_t: dX = g @ W, dx (B, n_in), dx[b, i] = sum over (o, t) with cols[o, t] == i of g[b, o] * values[o, t].
lib.define("ell_spmm_t(Tensor g, Tensor cols, Tensor values, int n_in) -> Tensor")
# ell_sddmm: dvalues (n_out, k), out[o, t] = sum_b g[b, o] * x[b, cols[o, t]].
lib.define("ell_sddmm(Tensor g, Tensor x, Tensor cols) -> Tensor")
