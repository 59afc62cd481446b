"""Plain-PyTorch references for every op: what tests and benchmarks compare against, and the fallback when
the compiled extension is not built. They favour clarity over speed but stay vectorised.
"""

from __future__ import annotations

import torch

from . import _semi24
from ._csr import as_bits, csr_flat, csr_rows

# ----------------------------------------------------------------------------------------------------------
# 2:4 compression (CUTLASS layout). Written from the format description, independently of torch's own
# conversion in torch.sparse._semi_structured_conversions, which the tests use as the oracle.


def _group_codes(group: int) -> torch.Tensor:
    """Code (idx0 | idx1 << 2) of every nonzero pattern of a group (bit j = element j nonzero).

    torch's Espresso-minimised encoding: a group with fewer than two nonzeros is padded with the positions
    torch pads it with (all-zero -> columns 2, 3); fp32 pairs (p, q) are coded as the halves (p, p, q, q).
    """
    codes = []
    for nz in range(1 << group):
        if group == 2:
            p, q = nz & 1, nz >> 1 & 1
            nz = p | p << 1 | q << 2 | q << 3
        m0, m1, m3 = nz & 1, nz >> 1 & 1, nz >> 3 & 1
        e0, e1, e2 = m0 & m1, (1 - m0) & m1, (1 - m0) & (1 - m1)
        idx0 = e1 | e2 << 1
        idx1 = (e0 | e2 | m3) | (e1 | (1 - m1)) << 1
        codes.append(idx0 | idx1 << 2)
    return torch.tensor(codes, dtype=torch.int64)


def semi24_meta_offsets(m: int, k_meta: int, meta_dtype: torch.dtype, device=None) -> torch.Tensor:
    """Flat output offset of every logical metadata element (r, c), as an (m, k_meta) int64 tensor."""
    int32 = meta_dtype == torch.int32
    group, interweave = (16, 2) if int32 else (32, 4)
    r = torch.arange(m, device=device).view(-1, 1).expand(m, k_meta)
    c = torch.arange(k_meta, device=device).view(1, -1).expand(m, k_meta)
    dr = r // group * group + (r % 8) * interweave + (r % group) // 8
    swap = (dr % 2 == 0).long() * (c % 2 == 1).long() - (dr % 2 == 1).long() * (c % 2 == 0).long()
    dr, dc = dr + swap, c - swap
    return (dc // 2) * m * 2 + dr * 2 + dc % 2


def _pack_codes(codes: torch.Tensor, fmt: _semi24.Semi24Format) -> torch.Tensor:
    m = codes.shape[0]
    shifts = 4 * torch.arange(fmt.codes_per_meta, device=codes.device)
    words = (codes.view(m, -1, fmt.codes_per_meta) << shifts).sum(-1)  # int64, exact
    bits = torch.iinfo(fmt.meta_dtype).bits
    words = (words + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))  # two's complement wrap
    return words.to(fmt.meta_dtype)


def semi24_compress_reference(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, meta) of an exactly 2:4 (fp32: 1:2) sparse ``dense`` (m, k); ValueError names a bad group."""
    fmt = _semi24.FORMATS[dense.dtype]
    m, k = dense.shape
    first_bad = _semi24.first_bad_group(dense)
    if first_bad >= 0:
        raise ValueError(_semi24.not_sparse_message("semi24_compress", (m, k), dense.dtype, first_bad))
    groups = dense.reshape(m, k // fmt.group, fmt.group)
    nz = ((groups != 0).long() << torch.arange(fmt.group, device=dense.device)).sum(-1)
    codes = _group_codes(fmt.group).to(dense.device)[nz]
    if fmt.group == 4:
        idx = torch.stack((codes & 3, codes >> 2), dim=-1)
    else:
        idx = ((codes & 3) // 2).unsqueeze(-1)
    packed = groups.gather(-1, idx).reshape(m, k // 2)
    words = _pack_codes(codes, fmt)
    meta = torch.empty_like(words).view(-1)
    meta[semi24_meta_offsets(m, words.shape[1], fmt.meta_dtype, dense.device).reshape(-1)] = words.reshape(-1)
    return packed, meta.view(m, -1)


def semi24_decompress_reference(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (m, 2 * packed.shape[1]) matrix that ``semi24_compress_reference`` compressed."""
    fmt = _semi24.FORMATS[packed.dtype]
    m, k = packed.shape[0], packed.shape[1] * 2
    offsets = semi24_meta_offsets(m, meta.shape[1], fmt.meta_dtype, packed.device)
    words = meta.reshape(-1)[offsets.reshape(-1)].view(m, -1).long()
    shifts = 4 * torch.arange(fmt.codes_per_meta, device=packed.device)
    codes = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(m, -1)
    idx0, idx1 = codes & 3, codes >> 2
    valid = (codes == 0x4) | (codes == 0xE) if fmt.group == 2 else idx0 < idx1
    if not bool(valid.all()):
        first_bad = int((~valid).flatten().nonzero()[0])
        raise ValueError(_semi24.invalid_meta_message("semi24_decompress", (m, k), packed.dtype, first_bad))
    dense = torch.zeros(m, k // fmt.group, fmt.group, dtype=packed.dtype, device=packed.device)
    if fmt.group == 4:
        dense.scatter_(-1, torch.stack((idx0, idx1), -1), packed.view(m, -1, 2))
    else:
        dense.scatter_(-1, (idx0 // 2).unsqueeze(-1), packed.view(m, -1, 1))
    return dense.view(m, k)


# ----------------------------------------------------------------------------------------------------------
# Masked sparse matmul. W is (n_out, n_in) in CSR: row_ptr int64 (n_out + 1), col_idx int32, values.


def csr_dense_scatter_reference(dense: torch.Tensor, values: torch.Tensor, row_ptr, col_idx, shadow=None) -> None:
    """dense[r, col_idx[j]] = values[j] for each nonzero j of row r, bit for bit; the rest of dense untouched.
    ``shadow`` (optional, nnz) becomes a copy of values."""
    as_bits(dense.view(-1)).scatter_(0, csr_flat(row_ptr, col_idx, dense.shape[1]), as_bits(values))
    if shadow is not None:
        shadow.copy_(values)


def csr_dense_gather_reference(dense: torch.Tensor, row_ptr, col_idx) -> torch.Tensor:
    """values[j] = dense[r, col_idx[j]] for each nonzero j of row r, bit for bit."""
    flat = csr_flat(row_ptr, col_idx, dense.shape[1])
    return as_bits(dense.view(-1)).index_select(0, flat).view(dense.dtype)


def spmm_reference(
    x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, n_out: int
) -> torch.Tensor:
    """y = x @ W.T for the CSR matrix W (n_out, x.shape[1]); fp32 accumulation (float64 for float64 input).

    Sums over the stored positions only (as torch.sparse does): a row of x holding inf or NaN, where the dense
    product would add 0 * inf = NaN at W's structural zeros, is summed over the nonzeros instead."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtype, rows, cols, x = x.dtype, csr_rows(row_ptr), col_idx.long(), x.to(acc)
    dense = torch.zeros(n_out, x.shape[1], dtype=acc, device=x.device)
    dense[rows, cols] = values.to(acc)
    y = x @ dense.T
    bad = (~torch.isfinite(x).all(1)).nonzero().reshape(-1)
    if bad.numel():
        products = x[bad][:, cols] * values.to(acc)  # (bad rows, nnz)
        y[bad] = torch.zeros_like(y[bad]).index_add_(1, rows, products)
    return y.to(dtype)


def sddmm_reference(g: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]]: the gradient of W's values, only at its nonzeros."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (g.to(acc).T @ x.to(acc))[csr_rows(row_ptr), col_idx.long()].to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Constant fan-in (ELL) sparse matmul. W is (n_out, n_in) with k nonzeros per row: cols int32 (n_out, k), each row
# ascending and unique, values (n_out, k). As for the CSR references, sums run over the stored positions only.


def _ell_dense(cols: torch.Tensor, values: torch.Tensor, n_in: int, acc: torch.dtype) -> torch.Tensor:
    """The dense (n_out, n_in) W of an ELL matrix, in ``acc``."""
    dense = torch.zeros(cols.shape[0], n_in, dtype=acc, device=values.device)
    return dense.scatter_(1, cols.long(), values.to(acc))


def ell_spmm_reference(x: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T, y[b, o] = sum_t values[o, t] * x[b, cols[o, t]]; fp32 accumulation (float64 for float64).

    A row of x holding inf or NaN is summed over W's nonzeros only (as :func:`spmm_reference`)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc)
    y = xs @ _ell_dense(cols, values, x.shape[1], acc).T
    bad = (~torch.isfinite(xs).all(1)).nonzero().reshape(-1)
    if bad.numel():
        y[bad] = (xs[bad][:, cols.long()] * values.to(acc)).sum(-1)  # (bad rows, n_out, k) -> (bad rows, n_out)
    return y.to(x.dtype)


def ell_spmm_t_reference(g: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_in: int) -> torch.Tensor:
    """dx = g @ W, dx[b, i] = sum over (o, t) with cols[o, t] == i of g[b, o] * values[o, t]; fp32 accumulation
    (float64 for float64). A row of g holding inf or NaN is summed over W's nonzeros only."""
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    gs = g.to(acc)
    dx = gs @ _ell_dense(cols, values, n_in, acc)
    bad = (~torch.isfinite(gs).all(1)).nonzero().reshape(-1)
    if bad.numel():
        products = (gs[bad].unsqueeze(-1) * values.to(acc)).reshape(bad.numel(), -1)  # (bad rows, n_out * k)
        dx[bad] = torch.zeros_like(dx[bad]).index_add_(1, cols.reshape(-1).long(), products)
    return dx.to(g.dtype)


def ell_sddmm_reference(g: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[o, t] = sum_b g[b, o] * x[b, cols[o, t]]: the gradient of W's values in the layout of ``values``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (g.to(acc).T @ x.to(acc)).gather(1, cols.long()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Fused top-k over the outer product (RigL grow). The exclusion is a CSR pattern (row_ptr int64, col_idx int32)
# over the (n_out, n_in) score matrix.


def outer_topk_scores_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The (n_out, n_in) float32 scores |sum_b g[b, o] * x[b, i]| in the order every kernel reproduces.

    The sum runs over b = 0, 1, ..., B - 1 from +0, each product rounded to float32 and then added (two
    roundings, never a fused multiply-add), with x and g first converted to float32. float64 inputs are summed
    the same way in float64 and the absolute value is rounded to float32 once at the end.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, gs = x.to(acc), g.to(acc)
    total = torch.zeros(g.shape[1], x.shape[1], dtype=acc, device=x.device)
    for b in range(x.shape[0]):
        total += torch.outer(gs[b], xs[b])  # outer rounds each product; += rounds each sum
    return total.abs().to(torch.float32)


def outer_topk_fast_scores_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The (n_out, n_in) float32 scores of precision="fast" on the reference backend: |g.T @ x| by a float64
    matmul (every input dtype converts to float64 exactly), rounded to float32 once. More accurate than any
    kernel's fast scores, and within their documented bound of each of them (ops/outer_topk.py)."""
    return (g.double().T @ x.double()).abs().to(torch.float32)


def outer_topk_reference(
    x: torch.Tensor, g: torch.Tensor, k: int, row_ptr: torch.Tensor, col_idx: torch.Tensor, fast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores outside the CSR pattern (row_ptr, col_idx): the exact scores
    (:func:`outer_topk_scores_reference`), or with ``fast`` the float64-matmul ones
    (:func:`outer_topk_fast_scores_reference`).

    Returns (index int64 (k), score float32 (k)): flat indices o * n_in + i sorted by score descending, equal
    scores by ascending index. Materialises the dense (n_out, n_in) scores: a brute-force oracle.
    """
    n_out, n_in = g.shape[1], x.shape[1]
    scores = (outer_topk_fast_scores_reference if fast else outer_topk_scores_reference)(x, g).reshape(-1)
    candidate = torch.ones(n_out * n_in, dtype=torch.bool, device=scores.device)
    candidate[csr_flat(row_ptr, col_idx, n_in)] = False
    flat = candidate.nonzero().squeeze(1)
    if bool(torch.isnan(scores[flat]).any()):  # only candidates count: an excluded score is never looked at
        raise ValueError("outer_topk: a score overflowed float32 to NaN (inf - inf); scale x or g down")
    # stable: equal scores keep ascending flat index
    order = torch.sort(scores[flat], descending=True, stable=True).indices[:k]
    return flat[order], scores[flat][order]
