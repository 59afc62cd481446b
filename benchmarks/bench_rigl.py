"""pytest-benchmark: RigL training overhead at ΔT=100 against the same training without mask updates (DESIGN §6:
goal < 3% of wall time), unstructured and with the structures of issue 15 (constant fan-in at 90%; 2:4, so 50%
uniform) kept by every update.

    pytest benchmarks/bench_rigl.py --benchmark-enable        # MLP 784-1024-1024-10 (SparseLinear, ERK 90%), B=256,
                                                              # 400 steps, t_end 300: mask updates at 100 and 200
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks/bench_rigl.py   # CI smoke: 64-128-128-10, B=32, 200 steps, 1 update

Both runs train the same model from the same start on the same batches; "static" steps the optimizer every step
(``sparsekern.Static``), "rigl" is ``sparsekern.RigL(delta_t=100)`` (which records layer inputs and output
gradients during update steps, grows through ``outer_topk`` and skips the optimizer step of update steps).
``test_rigl_overhead`` measures the mask updates' share of RigL's wall time (see its docstring) and records it;
the full run asserts the < 3% goal for unstructured RigL (the goal DESIGN sets) and records the structured
figures (a per-row / per-group grow from a blocked GEMM and torch top-k, not the fused ``outer_topk``); the quick
run (too short to time) only checks that both ran.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import _extension
from sparsekern.training import RigL, Static, sparsify

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK", "") == "1"
SIZES, BATCH, STEPS = ((64, 128, 128, 10), 32, 200) if QUICK else ((784, 1024, 1024, 10), 256, 400)
DELTA_T = 100
# structure -> (sparsity, distribution): 2:4 fixes the density at 50% in every layer
STRUCTURES = {None: (0.9, "erk"), "fan_in": (0.9, "erk"), "2:4": (0.5, "uniform")}


def group(structure: str | None) -> str:
    sparsity = STRUCTURES[structure][0]
    kind = f", {structure}" if structure else ""
    return f"RigL overhead MLP {'-'.join(map(str, SIZES))} B={BATCH} {STEPS} steps {sparsity:.0%}{kind} fp32"


def make_run(method: str, timed: list | None = None, structure: str | None = None):
    """A fresh model, optimizer and sparsifier; returns the function that trains STEPS steps (appending
    (seconds, mask updated) per step to ``timed`` if given)."""
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    sparsity, distribution = STRUCTURES[structure]
    sparsify(
        model, sparsity, distribution=distribution, structure=structure, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "rigl":
        sparsifier = RigL(model, optimizer, total_steps=STEPS, delta_t=DELTA_T)
    else:
        sparsifier = Static(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, SIZES[0], generator=gen), torch.randint(0, SIZES[-1], (BATCH,), generator=gen))
            for _ in range(8)]  # fmt: skip

    def run():
        updates = 0
        for step in range(STEPS):
            start = time.perf_counter()
            x, y = data[step % len(data)]
            F.cross_entropy(model(x), y).backward()
            updated = sparsifier.step()
            optimizer.zero_grad()
            updates += updated
            if timed is not None:
                timed.append((time.perf_counter() - start, updated))
        return updates

    return run


@pytest.mark.parametrize("structure", list(STRUCTURES), ids=str)
@pytest.mark.parametrize("method", ["static", "rigl"])
def test_training(benchmark, method, structure):
    benchmark.group = group(structure)
    updates = benchmark.pedantic(
        lambda run: run(), setup=lambda: ((make_run(method, structure=structure),), {}), rounds=1 if QUICK else 3
    )
    expected = len([t for t in range(1, STEPS + 1) if t % DELTA_T == 0 and t < int(0.75 * STEPS)])
    assert updates == (expected if method == "rigl" else 0)
    benchmark.extra_info["mask_updates"] = updates


@pytest.mark.parametrize("structure", list(STRUCTURES), ids=str)
def test_rigl_overhead(record_property, structure):
    """The mask updates' share of RigL's wall time, two ways.

    in-run: time every step of a RigL run; overhead = (update steps' time - as many ordinary steps, at their
    median) / (the run's time without that excess). Other processes on a shared machine slow all steps alike,
    so this is the stable figure and the one held to the goal.
    A/B: the fastest of alternating static and RigL runs; min(RigL) / min(static) - 1 (noisy when the machine
    is shared: it is recorded, not asserted).
    """
    runs = {"static": [], "rigl": []}
    excess = []
    for _ in range(1 if QUICK else 3):
        for method in runs:
            run = make_run(method, timed := [], structure)
            start = time.perf_counter()
            run()
            runs[method].append(time.perf_counter() - start)
            if method == "rigl":
                ordinary = statistics.median(t for t, updated in timed if not updated)
                extra = sum(t - ordinary for t, updated in timed if updated)
                excess.append(extra / (runs[method][-1] - extra))
    in_run = min(excess)
    ab = min(runs["rigl"]) / min(runs["static"]) - 1
    kernels = "C++ kernels" if _extension.build_info()["loaded"] else "plain-PyTorch reference (extension not loaded)"
    for name, value in (("rigl_overhead_in_run", in_run), ("rigl_overhead_ab", ab), ("kernels", kernels)):
        record_property(name, value)
    static, rigl = min(runs["static"]), min(runs["rigl"])
    goal = "goal < 3%" if structure is None else "recorded; DESIGN's < 3% is unstructured RigL's"
    print(f"\n{group(structure)}, {kernels}, {torch.get_num_threads()} threads: mask updates {in_run:+.2%} of "
          f"wall time in-run; A/B static {static:.3f}s vs RigL {rigl:.3f}s = {ab:+.2%} ({goal})")  # fmt: skip
    if not QUICK and structure is None:
        assert in_run < 0.03, f"RigL mask updates take {in_run:.2%} of wall time, goal < 3%"
