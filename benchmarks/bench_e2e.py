"""pytest-benchmark: training end to end where sparse layers pay off (DESIGN §6: RigL on SparseLinear >= 4x faster
per epoch than the same training dense at 95%, accuracy within the seeds' spread of RigL on masked weights).

    pytest benchmarks/bench_e2e.py --benchmark-enable        # MLP 64-4096-4096-10 on the digits, B=256, 10 epochs,
                                                             # the 4096x4096 layer at 95%, RigL ΔT=10, 2 seeds
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks/bench_e2e.py   # CI smoke: 64-256-256-10, 3 epochs, 1 seed

``test_training`` times one whole run per method (the model and its sparsification built outside the timing; the
test evaluation after each epoch is inside it, as it is for every method). ``test_e2e_goal`` runs
:func:`sparsekern.training.demo.run_wide` (the demo's wide section: the runs of a seed take turns epoch by epoch,
training time per epoch without the evaluation) on the ISA the process runs (``SPARSEKERN_CPU_ISA=avx2`` forces
AVX2), records the figures and, in the full run, asserts the goal. ``sparsekern bench e2e`` is the same
comparison with a markdown/JSON report and several ISAs in one run.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from sparsekern.training.demo import (
    GOAL_SPEEDUP,
    WIDE_METHODS,
    WideConfig,
    _WideTrainer,
    load_split,
    run_wide,
    sparse_kernels,
    wide_goal,
)

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK", "") == "1"
CFG = WideConfig.quick() if QUICK else WideConfig()
GROUP = f"e2e MLP 64-{CFG.hidden}-{CFG.hidden}-10 B={CFG.batch} {CFG.epochs} epochs {CFG.sparsity:.0%} fp32"


@pytest.mark.parametrize("method", WIDE_METHODS)
def test_training(benchmark, method):
    benchmark.group = GROUP
    data = load_split(CFG.seed)

    def train(trainer):
        for _ in range(CFG.epochs):
            trainer.epoch()
        return trainer.finish()

    setup = lambda: ((_WideTrainer(method, CFG, CFG.seed, data),), {})  # noqa: E731
    run = benchmark.pedantic(train, setup=setup, rounds=1 if QUICK else 2)
    benchmark.extra_info.update(
        cpu_isa=sparse_kernels(), s_per_epoch=run.s_per_epoch, accuracy=run.curve[-1], mask_updates=run.mask_updates
    )
    assert len(run.curve) == CFG.epochs and 0 <= run.curve[-1] <= 100
    if method != "dense":
        assert run.report["layers"][0]["nnz"] == round((1 - CFG.sparsity) * CFG.hidden**2)
        assert run.mask_updates == CFG.mask_updates() > 0


def test_e2e_goal(record_property):
    cfg = dataclasses.replace(CFG, seeds=1) if QUICK else CFG
    results = run_wide(cfg)
    by = {r.method: r for r in results}
    goal = wide_goal(results)
    for r in results:
        record_property(f"{r.method}_s_per_epoch", r.s_per_epoch)
        record_property(f"{r.method}_speedup", r.speedup)
        record_property(f"{r.method}_accuracy", r.accuracy)
    record_property("cpu_isa", sparse_kernels())
    print(f"\n{GROUP}, {sparse_kernels()}, {torch.get_num_threads()} threads: "
          + "; ".join(f"{r.label} {r.s_per_epoch:.3f} s/epoch {r.speedup:.2f}x {r.accuracy:.2f}%" for r in results)
          + "\n" + "\n".join(goal))  # fmt: skip
    if not QUICK:
        assert by["rigl-sparse"].speedup >= GOAL_SPEEDUP, goal[0]
        assert goal[1].endswith(", met"), goal[1]
