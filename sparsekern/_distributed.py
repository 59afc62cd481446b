"""What sparsekern exchanges between the ranks of a ``torch.distributed`` group: the grow's batches
(``outer_topk(group=...)``) and the checksums that prove every rank committed the same masks."""

from __future__ import annotations

import torch

from ._csr import VALUE_DTYPES


def all_gather_batch(fn: str, group, x, g, k, failure: Exception | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x and g of every rank of ``group`` concatenated along the batch in rank order. Batch sizes may differ;
    everything else must agree, which is checked on every rank alike (so all raise, none hangs). ``failure``:
    this rank's arguments failed their checks; every rank learns of it in the first collective and raises (this
    one its own error), so no rank waits for ever for a rank that left."""
    import torch.distributed as dist

    if failure is None:
        dtype_code = VALUE_DTYPES.index(x.dtype)
        meta = torch.tensor([0, x.shape[0], x.shape[1], g.shape[1], dtype_code, k], dtype=torch.int64, device=x.device)
    else:
        device = x.device if isinstance(x, torch.Tensor) else None
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        meta = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = [m.tolist() for m in metas]
    if failure is not None:
        raise failure
    failed = [rank for rank, m in enumerate(metas) if m[0]]
    if failed:
        raise ValueError(f"{fn}: the arguments of rank {failed[0]} of group failed their checks (its error says why)")
    metas = [m[1:] for m in metas]
    for rank, (_, n_in, n_out, code, k_r) in enumerate(metas):
        if (n_in, n_out, code, k_r) != tuple(metas[0][1:]):
            raise ValueError(
                f"{fn}: every rank of group must pass the same n_in, n_out, dtype and k; rank 0 has "
                f"(n_in={metas[0][1]}, n_out={metas[0][2]}, dtype={VALUE_DTYPES[metas[0][3]]}, k={metas[0][4]}), "
                f"rank {rank} has (n_in={n_in}, n_out={n_out}, dtype={VALUE_DTYPES[code]}, k={k_r})"
            )
    batches = [m[0] for m in metas]
    most = max(batches)

    def gather(t: torch.Tensor) -> torch.Tensor:
        # As raw bytes, padded to the largest batch: every backend moves uint8, whatever the dtype.
        raw = t.contiguous().view(torch.uint8)
        padded = raw.new_zeros(most, raw.shape[1])
        padded[: raw.shape[0]] = raw
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:b] for p, b in zip(parts, batches, strict=True)]).view(t.dtype)

    return gather(x), gather(g)


def _checksum(active: torch.Tensor) -> torch.Tensor:
    """A cheap int64 fingerprint of a set of flat indices (count, sum, a mixed sum)."""
    a = active.to(torch.int64)
    return torch.stack([a.new_tensor(a.numel()), a.sum(), (a * (a % 65521 + 1)).sum()])


def verify_masks_across_ranks(fn: str, group, actives: dict[str, torch.Tensor]) -> None:
    """Raise RuntimeError on every rank of ``group`` unless all ranks hold the same new masks ``actives``
    ({layer name: flat indices}), compared by checksums; call it before anything changes. No-op without a group."""
    if group is None or not actives:
        return
    import torch.distributed as dist

    local = torch.cat([_checksum(actives[name]) for name in sorted(actives)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(
                f"{fn}: the new masks of rank {rank} differ from rank 0's (checksums {other.tolist()} vs "
                f"{gathered[0].tolist()}); are the weights synchronised (DDP)? nothing changed"
            )
