"""outer_topk(group=...): two gloo processes on the CPU with unequal batches get identical results, equal to the
single-process result on the concatenated batch; disagreeing arguments raise on every rank (none hangs)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsekern
from sparsekern import _extension

WORLD = 2
BATCHES = (5, 12)  # unequal on purpose: the all-gather pads and trims
N_OUT, N_IN, K = 37, 53, 300
BACKENDS = ["cpu", "reference"] if _extension.available() else ["reference"]


def _inputs(rank: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(BATCHES[rank], N_IN, generator=gen).to(dtype)
    g = torch.randn(BATCHES[rank], N_OUT, generator=gen).to(dtype)
    return x, g


def _exclude() -> torch.Tensor:
    return torch.rand(N_OUT, N_IN, generator=torch.Generator().manual_seed(7)) < 0.3


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for backend in BACKENDS:
            for dtype in (torch.float32, torch.bfloat16):
                x, g = _inputs(rank, dtype)
                result = sparsekern.outer_topk(x, g, K, exclude=_exclude(), backend=backend, group=dist.group.WORLD)
                results[(backend, dtype)] = result
        x, g = _inputs(rank, torch.float32)
        try:  # rank 1 passes a different k: every rank must raise the same error
            sparsekern.outer_topk(x, g, K + rank, exclude=_exclude(), group=dist.group.WORLD)
            results["mismatch"] = "no error"
        except ValueError as exc:
            results["mismatch"] = str(exc)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_agree_with_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            parts = [_inputs(r, dtype) for r in range(WORLD)]
            x = torch.cat([p[0] for p in parts])
            g = torch.cat([p[1] for p in parts])
            expected = sparsekern.outer_topk(x, g, K, exclude=_exclude(), backend=backend)
            for result in ranks:
                index, score = result[(backend, dtype)]
                assert torch.equal(index, expected[0]) and torch.equal(score, expected[1]), (backend, dtype)
    for result in ranks:
        assert "every rank of group must pass the same n_in, n_out, dtype and k" in result["mismatch"]
        assert "rank 1 has (n_in=53, n_out=37, dtype=torch.float32, k=301)" in result["mismatch"]
