"""outer_topk(group=...): two gloo processes on the CPU with unequal batches get identical results (with
precision "fast" and "exact"), equal to the single-process result on the concatenated batch; disagreeing arguments
raise on every rank (none hangs)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from helpers import spawn_ranks

import sparsekern
from sparsekern import _extension

WORLD = 2
BATCHES = (5, 12)  # unequal on purpose: the all-gather pads and trims
N_OUT, N_IN, K = 37, 53, 300
BACKENDS = ["cpu", "reference"] if _extension.available() else ["reference"]
PRECISIONS = ("fast", "exact")


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
                for precision in PRECISIONS:
                    x, g = _inputs(rank, dtype)
                    result = sparsekern.outer_topk(
                        x, g, K, exclude=_exclude(), precision=precision, backend=backend, group=dist.group.WORLD
                    )
                    results[(backend, dtype, precision)] = result
        x, g = _inputs(rank, torch.float32)
        try:  # rank 1 passes a different k: every rank must raise the same error
            sparsekern.outer_topk(x, g, K + rank, exclude=_exclude(), group=dist.group.WORLD)
            results["mismatch"] = "no error"
        except ValueError as exc:
            results["mismatch"] = str(exc)
        for case, bad in (("bad k", {"k": -1}), ("bad g", {"g": g[:, :-1].T.contiguous()})):
            # only rank 1's arguments fail their own checks: rank 0 must not wait for it in the all-gather
            args = {"x": x, "g": g, "k": K, **(bad if rank == 1 else {})}
            try:
                sparsekern.outer_topk(args["x"], args["g"], args["k"], exclude=_exclude(), group=dist.group.WORLD)
                results[case] = "no error"
            except (TypeError, ValueError) as exc:
                results[case] = str(exc)
        # and the group still works afterwards
        results["after"] = sparsekern.outer_topk(x, g, K, exclude=_exclude(), group=dist.group.WORLD)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_agree_with_the_concatenated_batch(tmp_path):
    spawn_ranks(_worker, (_free_port(), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            for precision in PRECISIONS:
                parts = [_inputs(r, dtype) for r in range(WORLD)]
                x = torch.cat([p[0] for p in parts])
                g = torch.cat([p[1] for p in parts])
                expected = sparsekern.outer_topk(x, g, K, exclude=_exclude(), precision=precision, backend=backend)
                for result in ranks:
                    index, score = result[(backend, dtype, precision)]
                    assert torch.equal(index, expected[0]) and torch.equal(score, expected[1]), (backend, dtype)
    for result in ranks:
        assert "every rank of group must pass the same n_in, n_out, dtype and k" in result["mismatch"]
        assert "rank 1 has (n_in=53, n_out=37, dtype=torch.float32, k=301)" in result["mismatch"]
    assert ranks[1]["bad k"] == "outer_topk: k must be >= 0, got -1"
    assert "x (B, n_in) and g (B, n_out) must have the same batch size B" in ranks[1]["bad g"]
    for case in ("bad k", "bad g"):
        assert ranks[0][case] == "outer_topk: the arguments of rank 1 of group failed their checks (its error says why)"
    assert torch.equal(ranks[0]["after"][0], ranks[1]["after"][0])
