"""``sparsekern demo``: dense, RigL, SET, SNIP, static and IMP training of an MLP on the UCI digits, compared.

Everything runs on the CPU in a few minutes: the data set ships with the package (sparsekern/data), the sparse
models use SparseLinear layers (the sparse kernels), and the results are a table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("dense", "static", "snip", "set", "rigl", "imp")


@dataclass
class Config:
    sparsity: float = 0.9
    hidden: int = 256
    epochs: int = 40
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # RigL/SET update interval: 1440 images / 32 = 45 steps per epoch, so 25 steps gives ~50 updates before
    # t_end (RigL's ΔT=100 is for ImageNet-length runs; the rest of the schedule is the paper's)
    delta_t: int = 25
    imp_prune_fraction: float = 0.2
    seed: int = 0
    seeds: int = 3  # runs per method (seed, seed + 1, ...; each with its own data split); the table shows the mean
    methods: tuple[str, ...] = METHODS

    @classmethod
    def quick(cls, **overrides) -> Config:
        base = dict(hidden=64, epochs=3, delta_t=10, imp_prune_fraction=0.6, seeds=1)
        base.update(overrides)
        return cls(**base)


@dataclass
class Result:
    method: str
    accuracy: float  # final test accuracy, percent (mean over the seeds)
    curve: list[float]  # test accuracy after each epoch, mean over the seeds (IMP: its last round)
    wall_s: float  # training wall time of one run (mean over the seeds; IMP: all its rounds)
    report: dict | None = None  # per-layer sparsity of the first seed's model; None for dense
    layer_ms: float = 0.0  # forward+backward time of the Linear layers for one batch (first seed's model)
    accuracies: list[float] = field(default_factory=list)  # one per seed
    extra: dict = field(default_factory=dict)

    @property
    def accuracy_sd(self) -> float:
        return float(np.std(self.accuracies)) if len(self.accuracies) > 1 else 0.0


def load_split(seed: int) -> tuple[torch.Tensor, ...]:
    """Digits scaled to [0, 1], split 80/20 with a seeded permutation: (x_train, y_train, x_test, y_test)."""
    from ..data import load_digits

    images, labels = load_digits()
    x, y = torch.from_numpy(images / 16.0).float(), torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return 100.0 * correct / len(y)


def _batches(n: int, batch: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch] for i in range(0, n, batch)]


def train(model, data, cfg: Config, *, sparsifier_factory=None, desc: str = "", on_step=None) -> list[float]:
    """SGD with momentum and a cosine learning rate; ``sparsifier_factory(model, optimizer, total_steps)``
    returns the sparsifier to step (None: plain optimizer steps). Returns the test accuracy after each epoch."""
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = data
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    sparsifier = sparsifier_factory(model, optimizer, total) if sparsifier_factory else None
    step = sparsifier.step if sparsifier is not None else optimizer.step
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    curve = []
    for _ in tqdm(range(cfg.epochs), desc=desc, leave=False, unit="epoch"):
        for idx in _batches(len(y_train), cfg.batch, generator):
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            step()
            optimizer.zero_grad()
            schedule.step()
        curve.append(accuracy(model, x_test, y_test))
    return curve


def layer_time_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median forward+backward time (ms) of the model's Linear/SparseLinear layers alone, on their real inputs."""
    from ..nn.sparse_linear import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear))]
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.__setitem__(m, a[0].detach())) for m in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for m in layers:
            inp = inputs[m].requires_grad_(True)
            m(inp).sum().backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return 1000.0 * float(np.median(times))


def run_method(method: str, cfg: Config, data) -> Result:
    from . import IMP, SET, SNIP, RigL, Static, compress, snip_scores, sparsify, sparsity_report

    x_train, y_train = data[0], data[1]
    model = make_mlp(cfg.hidden, cfg.seed)
    start = time.perf_counter()
    extra = {}
    if method == "dense":
        curve = train(model, data, cfg, desc=method)
    elif method in ("static", "set", "rigl"):
        sparsify(model, cfg.sparsity, generator=torch.Generator().manual_seed(cfg.seed), rescale=True)
        factory = {
            "static": lambda m, o, total: Static(m, o),
            "set": lambda m, o, total: SET(m, o, total_steps=total, delta_t=cfg.delta_t, seed=cfg.seed),
            "rigl": lambda m, o, total: RigL(m, o, total_steps=total, delta_t=cfg.delta_t),
        }[method]
        curve = train(model, data, cfg, sparsifier_factory=factory, desc=method)
    elif method == "snip":
        # SNIP's saliency on one batch of the dense initial model, global top-k
        idx = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.batch * 4]
        scores = snip_scores(model, lambda m: F.cross_entropy(m(x_train[idx]), y_train[idx]))
        sparsify(model, cfg.sparsity, distribution="global", scores=scores, rescale=True)
        curve = train(model, data, cfg, sparsifier_factory=lambda m, o, total: SNIP(m, o), desc=method)
    elif method == "imp":
        # masked dense weights while the rounds are nearly dense; the final ticket then moves to SparseLinear
        imp = IMP(model, cfg.sparsity, prune_fraction=cfg.imp_prune_fraction, layout="masked")
        for r in range(imp.rounds):
            holder = {}

            def factory(m, o, total, holder=holder):
                holder["s"] = imp.start_round(o)
                return holder["s"]

            curve = train(model, data, cfg, sparsifier_factory=factory, desc=f"imp {r + 1}/{imp.rounds}")
            imp.end_round(accuracy=curve[-1])
        extra["rounds"] = [{"round": row.round, "sparsity": row.report.sparsity, **row.metrics} for row in imp.history]
        compress(model)
    else:
        raise ValueError(f"demo: method must be one of {METHODS}, got {method!r}")
    wall = time.perf_counter() - start
    report = None if method == "dense" else sparsity_report(model).to_dict()
    layer_ms = layer_time_ms(model, x_train[: cfg.batch])
    return Result(method, curve[-1], curve, wall, report, layer_ms, [curve[-1]], extra)


def run_seeds(method: str, cfg: Config) -> Result:
    """``run_method`` for seeds cfg.seed, cfg.seed + 1, ... (each its own split and init), averaged."""
    runs = []
    for i in range(cfg.seeds):
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)
        runs.append(run_method(method, seed_cfg, load_split(seed_cfg.seed)))
    first = runs[0]
    return Result(
        method,
        float(np.mean([r.accuracy for r in runs])),
        np.mean([r.curve for r in runs], axis=0).tolist(),
        float(np.mean([r.wall_s for r in runs])),
        first.report,
        first.layer_ms,
        [r.accuracy for r in runs],
        first.extra,
    )


def format_table(results: list[Result]) -> str:
    dense = next((r for r in results if r.method == "dense"), None)
    layer_names = []
    for r in results:
        for layer in (r.report or {}).get("layers", []):
            if layer["name"] not in layer_names:
                layer_names.append(layer["name"])
    head = ["method", "test acc %", "vs dense", *[f"sp {n}" for n in layer_names], "sp overall", "wall s",
            "layers ms/batch", "vs dense"]  # fmt: skip
    rows = [head]
    for r in results:
        by_name = {layer["name"]: layer["sparsity"] for layer in (r.report or {}).get("layers", [])}
        rows.append([
            r.method,
            f"{r.accuracy:.2f} ± {r.accuracy_sd:.2f}",
            f"{r.accuracy - dense.accuracy:+.2f}" if dense else "",
            *[f"{by_name[n]:.3f}" if n in by_name else "0" for n in layer_names],
            f"{r.report['overall']['sparsity']:.3f}" if r.report else "0",
            f"{r.wall_s:.1f}",
            f"{r.layer_ms:.3f}",
            f"{r.layer_ms / dense.layer_ms:.2f}x" if dense else "",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def plot(results: list[Result], path: Path, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        label = f"{r.method} ({r.accuracy:.1f}%)" + (" last round" if r.method == "imp" else "")
        ax.plot(range(1, len(r.curve) + 1), r.curve, label=label, linestyle="--" if r.method == "dense" else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    runs = "" if cfg.seeds == 1 else f", mean of {cfg.seeds} seeds"
    ax.set_title(f"UCI digits MLP 64-{cfg.hidden}-{cfg.hidden}-10, sparsity {cfg.sparsity:.0%}{runs}")
    low = min(min(r.curve) for r in results)
    ax.set_ylim(max(0.0, min(low, 80.0)), 100.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kernels() -> str:
    from .. import _extension

    return "the C++ kernels" if _extension.build_info()["loaded"] else "the plain-PyTorch reference (no extension)"


def run_demo(cfg: Config, out: Path, *, make_plot: bool = True, echo=print) -> list[Result]:
    out.mkdir(parents=True, exist_ok=True)
    data = load_split(cfg.seed)
    seeds = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}, mean ± sd"
    echo(
        f"UCI digits: {len(data[1])} train / {len(data[3])} test images; MLP 64-{cfg.hidden}-{cfg.hidden}-10; "
        f"sparsity {cfg.sparsity:.0%} (ERK; SNIP and IMP: global); {cfg.epochs} epochs; {seeds}; "
        f"{torch.get_num_threads()} threads; sparse layers on {_kernels()}"
    )
    results = []
    for method in cfg.methods:
        results.append(run_seeds(method, cfg))
        echo(f"  {method}: {results[-1].accuracy:.2f}% ({results[-1].wall_s:.1f}s per run)")
    table = format_table(results)
    echo(table)
    echo(
        "wall s: training time of one run (IMP: all its rounds). layers ms/batch: forward+backward of the Linear "
        f"layers alone for one batch of {cfg.batch} (SparseLinear for the sparse methods; median of 20); "
        "vs dense below 1x means the sparse layers are faster"
    )
    payload = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernels": _kernels(),
        "results": [{**r.__dict__, "accuracy_sd": r.accuracy_sd} for r in results],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    echo(f"wrote {out / 'results.json'}")
    if make_plot:
        plot(results, out / "accuracy.png", cfg)
        echo(f"wrote {out / 'accuracy.png'}")
    return results


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    d = Config()
    parser.add_argument("--sparsity", type=float, default=d.sparsity, help="target sparsity (default 0.9)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {d.epochs})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden width (default {d.hidden})")
    parser.add_argument("--seed", type=int, default=d.seed, help="first seed")
    parser.add_argument("--seeds", type=int, default=None, help=f"runs per method, averaged (default {d.seeds})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("sparsekern-demo"), help="output folder (JSON, PNG)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run (small MLP, 3 epochs)")


def demo_main(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"sparsekern demo: --methods must name some of {','.join(METHODS)}, got {args.methods!r}")
    if not 0 < args.sparsity < 1:
        raise SystemExit(f"sparsekern demo: --sparsity must lie in (0, 1), got {args.sparsity}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"sparsekern demo: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    overrides = {"sparsity": args.sparsity, "seed": args.seed, "methods": methods}
    for name in ("epochs", "hidden", "seeds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = Config.quick(**overrides) if args.quick else Config(**overrides)
    run_demo(cfg, args.out, make_plot=not args.no_plot)
    return 0
