"""``sparsekern demo``: dense, small-dense, static, SNIP, GraSP, SynFlow, SET, RigL, GMP, SNFS, STE, SR-STE and IMP
training of an MLP on the UCI digits, compared, with their FLOPs.

Everything runs on the CPU in a few minutes: the data set ships with the package (sparsekern/data), the sparse
models use SparseLinear layers (the sparse kernels), and the results are a table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The default run: the RigL paper's headline comparison and IMP, about 40 s per seed on one thread of the 2-core
# machine, idle (IMP's rounds half of it; the whole default demo with the wide MLP: under 4 minutes); --methods
# all adds the rest (GraSP, SynFlow, STE, SR-STE)
DEFAULT_METHODS = (
    "dense", "small_dense", "static", "snip", "set", "rigl", "rigl_fan_in", "rigl_2:4", "snfs", "gmp", "imp"
)  # fmt: skip
OUT_FILES = ("results.json", "accuracy.png")  # what the demo writes into --out


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
    methods: tuple[str, ...] = DEFAULT_METHODS

    @classmethod
    def quick(cls, **overrides) -> Config:
        base = dict(hidden=64, epochs=3, delta_t=10, imp_prune_fraction=0.6, seeds=1)
        base.update(overrides)
        return cls(**base)

    def check(self, fn: str, names: Callable[[str], str] = str) -> Config:
        """Raise ValueError for any value the run cannot use, naming the field as ``names(field)`` (the command
        line passes its option names); returns self."""
        _check_run_fields(self, fn, names, fractions=("sparsity", "imp_prune_fraction"))
        methods = self.methods
        if not methods or isinstance(methods, str) or any(m not in METHODS for m in methods):
            raise ValueError(f"{fn}: {names('methods')} must name some of {','.join(METHODS)}, got {methods!r}")
        return self


SEED_LIMIT = 2**32  # seeds feed torch.Generator.manual_seed (64-bit); one bound for every run's seed + offsets


def _check_run_fields(cfg, fn: str, names: Callable[[str], str], fractions: tuple[str, ...] = ("sparsity",)) -> None:
    """The checks :class:`Config` and :class:`WideConfig` share: positive int sizes and counts, fractions in
    (0, 1), a positive learning rate and a seed range; raises ValueError naming the field as ``names(field)``."""
    for name in ("hidden", "epochs", "batch", "delta_t", "seeds"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {names(name)} must be a positive int, got {value!r}")
    for name in fractions:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{fn}: {names(name)} must lie in (0, 1), got {value!r}")
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not 0 < cfg.lr < math.inf:
        raise ValueError(f"{fn}: {names('lr')} must be a positive number, got {cfg.lr!r}")
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{fn}: {names('seed')} must be an int in [0, 2**32), got {seed!r}")


def check_plot(fn: str) -> None:
    """Refuse to start a run whose plot would fail at its end for want of matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"{fn}: the plot needs matplotlib (pip install matplotlib); --no-plot skips it")


def check_out_dir(fn: str, out: Path, files: Sequence[str], name: str = "out") -> None:
    """Create the output folder ``out`` and prove it writable (a probe file) before any training, so a bad
    ``--out`` fails in a second, not after minutes of training; the ``files`` to be written there must not
    exist as anything but writable files. Raises ValueError naming ``name``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".sparsekern-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{fn}: {name} {str(out)!r} is not a writable folder ({reason})") from None
    for file in files:
        path = out / file
        if path.exists() and not (path.is_file() and os.access(path, os.W_OK)):
            raise ValueError(f"{fn}: {name} {str(out)!r} holds {file!r}, which cannot be overwritten")


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
    flops: dict = field(default_factory=dict)  # training/inference FLOPs as fractions of dense (mean over the seeds)

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


def epochs(model, data, cfg, *, sparsifier_factory=None, update_s: list | None = None, losses: list | None = None):
    """Training one epoch per ``next()``: SGD with momentum and a cosine learning rate over ``cfg.epochs`` epochs
    (``cfg``: a :class:`Config` or :class:`WideConfig`); ``sparsifier_factory(model, optimizer, total_steps)``
    returns the sparsifier to step (None: plain optimizer steps). Yields (seconds of the epoch's steps, test
    accuracy after it); appends the seconds of each ``step()`` call that moved the masks to ``update_s`` and each
    batch's training loss to ``losses``."""
    x_train, y_train, x_test, y_test = data
    total = math.ceil(len(y_train) / cfg.batch) * cfg.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sparsifier = sparsifier_factory(model, optimizer, total) if sparsifier_factory else None
    # after the sparsifier: one that adds a parameter group (STE's scores) has it driven by the schedule too
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    step = sparsifier.step if sparsifier is not None else optimizer.step
    if update_s is not None and sparsifier is not None:

        def step():
            start = time.perf_counter()
            if sparsifier.step():
                update_s.append(time.perf_counter() - start)

    generator = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        for idx in _batches(len(y_train), cfg.batch, generator):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            if losses is not None:
                losses.append(loss.item())
            step()
            optimizer.zero_grad()
            schedule.step()
        seconds = time.perf_counter() - start
        yield seconds, accuracy(model, x_test, y_test)


def train(
    model, data, cfg: Config, *, sparsifier_factory=None, desc: str = "", losses: list | None = None
) -> list[float]:
    """:func:`epochs` to the end, with a progress bar; returns the test accuracy after each epoch (and appends each
    batch's training loss to ``losses``)."""
    from tqdm.auto import tqdm

    run = epochs(model, data, cfg, sparsifier_factory=sparsifier_factory, losses=losses)
    return [acc for _, acc in tqdm(run, total=cfg.epochs, desc=desc, leave=False, unit="epoch")]


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


# -- the methods: each one small function (model, data, cfg) -> _Trained, registered under its --methods name -----


@dataclass
class _Trained:
    curve: list[float]  # test accuracy after each epoch
    flops: dict  # {"training", "inference": fractions of dense, "rule": how training was counted, "report": ...}
    extra: dict = field(default_factory=dict)
    model: nn.Module | None = None  # the model trained, when it is not the one the method was given (small-dense)


_REGISTRY: dict[str, Callable[[nn.Module, tuple, Config], _Trained]] = {}


def _method(name: str):
    def register(fn):
        _REGISTRY[name] = fn
        return fn

    return register


def _flops(report, *, training: float | None = None, rule: str | None = None) -> dict:
    """The FLOPs entry of a result from a :class:`FlopsReport` (training overridable: IMP's rounds add up)."""
    return {
        "training": report.training_fraction if training is None else training,
        "inference": report.inference_fraction,
        "rule": rule or report.rule,
        "report": report.to_dict(),
    }


def _with_sparsifier(model, data, cfg, factory, desc, finish=None) -> _Trained:
    """Train with the sparsifier ``factory(model, optimizer, total_steps)`` builds; FLOPs under its rule; then
    ``finish(sparsifier)``."""
    made = []

    def keep(m, o, total):
        made.append(factory(m, o, total))
        return made[-1]

    curve = train(model, data, cfg, sparsifier_factory=keep, desc=desc)
    done = _Trained(curve, _flops(made[0].flops_report(example_input=data[2][:2])))
    if finish is not None:
        finish(made[0])
    return done


def _latent_done(sparsifier) -> None:
    """STE/SR-STE trained dense latent weights under masks: zero them off the masks, then SparseLinear layers."""
    from . import to_sparse_linear

    sparsifier.finalize()
    to_sparse_linear(sparsifier.model)


def _sparse_start(model, cfg):
    """RigL's start for every sparse-to-sparse method: ERK, random positions, the sparsity-aware rescale."""
    from . import sparsify

    sparsify(model, cfg.sparsity, generator=torch.Generator().manual_seed(cfg.seed), rescale=True)


def _score_batch(cfg, data):
    """The batch pruning-at-initialisation scores use: 4 batches' worth of training images, seeded."""
    x_train, y_train = data[0], data[1]
    idx = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.batch * 4]
    return x_train[idx], y_train[idx]


@_method("dense")
def _dense(model, data, cfg):
    from . import flops_report

    curve = train(model, data, cfg, desc="dense")
    return _Trained(curve, _flops(flops_report(model, example_input=data[2][:2])))


@_method("small_dense")
def _small_dense(model, data, cfg):
    from . import flops_report, small_dense

    # the RigL paper's baseline: as many weights as the sparse models' nonzeros, in a narrower dense model; its
    # FLOPs are those of the narrow model over the wide one's
    small = small_dense(model, cfg.sparsity)
    x = data[2][:2]
    fraction = flops_report(small, example_input=x).dense_forward / flops_report(model, example_input=x).dense_forward
    curve = train(small, data, cfg, desc="small_dense")
    widths = [m.out_features for m in small if isinstance(m, nn.Linear)]
    flops = {"training": fraction, "inference": fraction, "rule": "dense (narrow)", "report": None}
    weights = sum(m.weight.numel() for m in small if isinstance(m, nn.Linear))
    return _Trained(curve, flops, {"widths": widths, "weights": weights}, model=small)


@_method("static")
def _static(model, data, cfg):
    from . import Static

    _sparse_start(model, cfg)
    return _with_sparsifier(model, data, cfg, lambda m, o, total: Static(m, o), "static")


@_method("snip")
def _snip(model, data, cfg):
    from . import SNIP, snip_scores, sparsify

    # SNIP's saliency on a batch of the dense initial model, global top-k
    x, y = _score_batch(cfg, data)
    scores = snip_scores(model, lambda m: F.cross_entropy(m(x), y))
    sparsify(model, cfg.sparsity, distribution="global", scores=scores, rescale=True)
    return _with_sparsifier(model, data, cfg, lambda m, o, total: SNIP(m, o), "snip")


@_method("set")
def _set(model, data, cfg):
    from . import SET

    _sparse_start(model, cfg)
    factory = lambda m, o, total: SET(m, o, total_steps=total, delta_t=cfg.delta_t, seed=cfg.seed)  # noqa: E731
    return _with_sparsifier(model, data, cfg, factory, "set")


@_method("rigl")
def _rigl(model, data, cfg):
    from . import RigL

    _sparse_start(model, cfg)
    factory = lambda m, o, total: RigL(m, o, total_steps=total, delta_t=cfg.delta_t)  # noqa: E731
    return _with_sparsifier(model, data, cfg, factory, "rigl")


@_method("rigl_fan_in")
def _rigl_fan_in(model, data, cfg):
    """RigL under constant fan-in (every output row keeps the same count): the layers run the ELL kernels; their
    time is measured against the CSR kernels on the same weights, in the same process."""
    from ..nn.sparse_linear import SparseLinear
    from . import RigL, sparsify

    sparsify(model, cfg.sparsity, generator=torch.Generator().manual_seed(cfg.seed), rescale=True, structure="fan_in")
    factory = lambda m, o, total: RigL(m, o, total_steps=total, delta_t=cfg.delta_t)  # noqa: E731
    done = _with_sparsifier(model, data, cfg, factory, "rigl fan-in")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    x = data[0][: cfg.batch]
    times = {}
    for kernels in ("csr", "auto", "csr", "auto"):  # interleaved: the second pair is the one kept
        for m in layers:
            m.kernels = kernels
        times[kernels] = layer_time_ms(model, x)
    done.extra.update(
        fan_in={f"{name}.weight": m.nnz // m.out_features for name, m in model.named_modules() if m in layers},
        ell_layer_ms=times["auto"],
        csr_layer_ms=times["csr"],
    )
    return done


def _dense_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every SparseLinear replaced by its dense nn.Linear (the same weights)."""
    from ..nn.sparse_linear import SparseLinear

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, SparseLinear):
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, attr, module.to_dense())
    return twin


@_method("rigl_2:4")
def _rigl_24(model, data, cfg):
    """RigL with 2:4 masks (50% sparsity, whatever --sparsity says), exported by export_semi24 to float16 2:4
    tensors and evaluated on the CPU from their decompression: the accuracy must equal the trained model's with
    its weights rounded to float16, since the exported tensors hold exactly those weights."""
    from ..export import decompress_model, export_semi24
    from . import RigL, sparsify

    sparsify(
        model,
        0.5,
        distribution="uniform",
        generator=torch.Generator().manual_seed(cfg.seed),
        rescale=True,
        structure="2:4",
    )
    factory = lambda m, o, total: RigL(m, o, total_steps=total, delta_t=cfg.delta_t)  # noqa: E731
    done = _with_sparsifier(model, data, cfg, factory, "rigl 2:4")
    exported, report = export_semi24(model, dtype=torch.float16)
    x_test, y_test = data[2], data[3]
    # both evaluated in float32 from dense float16 weights: the trained ones rounded, and the exported ones
    trained = _dense_twin(model).half().float()
    deployed = _dense_twin(decompress_model(exported)).float()
    for (name, a), (_, b) in zip(trained.state_dict().items(), deployed.state_dict().items(), strict=True):
        if not torch.equal(a, b):
            raise RuntimeError(f"demo: the exported weights differ from the trained ones at {name}")
    acc_trained, acc_exported = accuracy(trained, x_test, y_test), accuracy(deployed, x_test, y_test)
    if acc_trained != acc_exported:
        raise RuntimeError(f"demo: exported accuracy {acc_exported} != trained {acc_trained}")
    done.extra.update(
        exported=[layer.name for layer in report.layers if layer.converted],
        skipped={layer.name: layer.reason for layer in report.layers if not layer.converted},
        fp16_accuracy=acc_exported,
    )
    return done


@_method("grasp")
def _grasp(model, data, cfg):
    from . import GraSP, grasp_scores, sparsify

    # GraSP's Hessian-gradient scores on the batch SNIP uses, global top-k. Without the rescale the other rows get,
    # as in the paper: the weights GraSP keeps are not a random draw of the initialisation, and rescaled by
    # sqrt(numel / nnz) one seed of three diverged to chance (8%; 98.6% without) at 90%
    x, y = _score_batch(cfg, data)
    scores = grasp_scores(model, [(x, y)])
    sparsify(model, cfg.sparsity, distribution="global", scores=scores)
    return _with_sparsifier(model, data, cfg, lambda m, o, total: GraSP(m, o), "grasp")


@_method("synflow")
def _synflow(model, data, cfg):
    from . import SynFlow, sparsify, synflow_scores

    # data-free: only the input's shape is used; 100 rounds to the target, global top-k
    scores = synflow_scores(model, data[0][:1], sparsity=cfg.sparsity)
    sparsify(model, cfg.sparsity, distribution="global", scores=scores, rescale=True)
    return _with_sparsifier(model, data, cfg, lambda m, o, total: SynFlow(m, o), "synflow")


@_method("gmp")
def _gmp(model, data, cfg):
    from . import GMP, sparsify

    # dense to sparse: every layer starts dense (SparseLinear holding every weight) and is pruned on the cubic
    # schedule every ΔT steps until 75% of the run, to ERK's per-layer counts (as the sparse-to-sparse rows)
    sparsify(model, 0.0)
    factory = lambda m, o, total: GMP(m, o, sparsity=cfg.sparsity, total_steps=total, delta_t=cfg.delta_t,  # noqa: E731
                                      distribution="erk")  # fmt: skip
    return _with_sparsifier(model, data, cfg, factory, "gmp")


@_method("snfs")
def _snfs(model, data, cfg):
    from . import SNFS

    # sparse momentum: updates once per epoch, as the paper (prune rate 0.5, cosine decay), from RigL's start
    _sparse_start(model, cfg)
    per_epoch = math.ceil(len(data[1]) / cfg.batch)
    factory = lambda m, o, total: SNFS(m, o, total_steps=total, delta_t=per_epoch, momentum=cfg.momentum)  # noqa: E731
    return _with_sparsifier(model, data, cfg, factory, "snfs")


@_method("ste")
def _ste(model, data, cfg):
    from . import STE

    # learned scores (edge-popup) with the weights: dense latent weights, ERK counts, then SparseLinear at the end
    factory = lambda m, o, total: STE(m, o, sparsity=cfg.sparsity, seed=cfg.seed)  # noqa: E731
    return _with_sparsifier(model, data, cfg, factory, "ste", finish=_latent_done)


@_method("srste")
def _srste(model, data, cfg):
    from . import SRSTE

    # 2:4 masks from |w| every step with the sparse-refined decay: 50% sparse whatever --sparsity says
    factory = lambda m, o, total: SRSTE(m, o, n=2, m=4)  # noqa: E731
    return _with_sparsifier(model, data, cfg, factory, "srste", finish=_latent_done)


@_method("imp")
def _imp(model, data, cfg):
    from . import IMP, to_sparse_linear

    # masked dense weights while the rounds are nearly dense; the final ticket then moves to SparseLinear
    imp = IMP(model, cfg.sparsity, prune_fraction=cfg.imp_prune_fraction, layout="masked")
    rounds = []
    for r in range(imp.rounds):
        holder = {}

        def factory(m, o, total, holder=holder):
            holder["s"] = imp.start_round(o)
            return holder["s"]

        curve = train(model, data, cfg, sparsifier_factory=factory, desc=f"imp {r + 1}/{imp.rounds}")
        rounds.append(holder["s"].flops_report(example_input=data[2][:2]))
        imp.end_round(accuracy=curve[-1])
    extra = {"rounds": [{"round": row.round, "sparsity": row.report.sparsity, **row.metrics} for row in imp.history]}
    to_sparse_linear(model)
    # every round is a full training run: IMP's training FLOPs are the rounds' sum (over one dense run's)
    training = sum(report.training_fraction for report in rounds)
    return _Trained(curve, _flops(rounds[-1], training=training, rule=f"sparse x {len(rounds)} rounds"), extra)


METHODS = tuple(_REGISTRY)


def run_method(method: str, cfg: Config, data) -> Result:
    from . import sparsity_report
    from .sparsify import sparse_layers

    if method not in _REGISTRY:
        raise ValueError(f"demo: method must be one of {METHODS}, got {method!r}")
    model = make_mlp(cfg.hidden, cfg.seed)
    start = time.perf_counter()
    done = _REGISTRY[method](model, data, cfg)
    wall = time.perf_counter() - start
    model = done.model or model
    report = sparsity_report(model).to_dict() if sparse_layers(model) else None
    layer_ms = layer_time_ms(model, data[0][: cfg.batch])
    return Result(method, done.curve[-1], done.curve, wall, report, layer_ms, [done.curve[-1]], done.extra, done.flops)


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
        {**first.flops, **{k: float(np.mean([r.flops[k] for r in runs])) for k in ("training", "inference")}},
    )


def format_table(results: list[Result]) -> str:
    dense = next((r for r in results if r.method == "dense"), None)
    layer_names = []
    for r in results:
        for layer in (r.report or {}).get("layers", []):
            if layer["name"] not in layer_names:
                layer_names.append(layer["name"])
    head = ["method", "test acc %", "vs dense", "train FLOPs", "infer FLOPs", *[f"sp {n}" for n in layer_names],
            "sp overall", "wall s", "layers ms/batch", "vs dense"]  # fmt: skip
    rows = [head]
    for r in results:
        by_name = {layer["name"]: layer["sparsity"] for layer in (r.report or {}).get("layers", [])}
        rows.append([
            r.method,
            f"{r.accuracy:.2f} ± {r.accuracy_sd:.2f}",
            f"{r.accuracy - dense.accuracy:+.2f}" if dense else "",
            f"{r.flops['training']:.3f}x",
            f"{r.flops['inference']:.3f}x",
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


def structured_notes(results: list[Result]) -> list[str]:
    """What the structured rows measured beside the table: the fan-in row's layer time on the ELL kernels against
    the CSR kernels, and the 2:4 row's export (first seed's model)."""
    lines = []
    for r in results:
        if "ell_layer_ms" in r.extra:
            ell, csr = r.extra["ell_layer_ms"], r.extra["csr_layer_ms"]
            lines.append(
                f"{r.method}: fan-in per layer {r.extra['fan_in']}; layers {ell:.3f} ms/batch on the ELL kernels vs "
                f"{csr:.3f} ms on the CSR kernels, same weights ({csr / ell:.2f}x)"
            )
        if "exported" in r.extra:
            skipped = "; ".join(f"{name}: {why}" for name, why in r.extra["skipped"].items()) or "none"
            lines.append(
                f"{r.method}: exported to float16 2:4 tensors: layers {', '.join(r.extra['exported'])} (skipped: "
                f"{skipped}); accuracy from the exported tensors (decompressed on the CPU) "
                f"{r.extra['fp16_accuracy']:.2f}%, identical to the trained model's in float16"
            )
    return lines


# -- the wide MLP: where the sparse layers pay off ------------------------------------------------------------

WIDE_METHODS = ("dense", "rigl-masked", "rigl-sparse")
WIDE_LAYOUT = {"dense": "nn.Linear", "rigl-masked": "masked nn.Linear", "rigl-sparse": "SparseLinear"}
# DESIGN §6: RigL on SparseLinear per epoch >= 4x the same training dense, for the 4096-wide MLP at 95%
GOAL_SPEEDUP, GOAL_WIDTH, GOAL_SPARSITY = 4.0, 4096, 0.95


@dataclass
class WideConfig:
    """The wide-MLP comparison: 64-hidden-hidden-10, the hidden x hidden layer at ``sparsity`` (uniform), the
    small first and last layers dense (1.8% of the weights at hidden 4096, and the inputs/outputs every class
    needs), trained dense, with RigL on masked dense weights and with RigL on SparseLinear."""

    hidden: int = 4096
    sparsity: float = 0.95
    epochs: int = 10
    batch: int = 256
    lr: float = 0.2  # reaches ~97% dense and ~97% RigL at 95% in 10 epochs at width 4096 (0.1: ~97% / ~94%)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # 1438 images / 256 = 6 steps per epoch, 60 in the run: RigL's ΔT=100 would never fire. ΔT=10 until 75% of the
    # run moves the masks 4 times (steps 10, 20, 30, 40; a quarter of the connections in all), keeping the update
    # steps to 1 in 15 (the paper's runs: 1 in 100); α=0.3 and the cosine decay are the paper's
    delta_t: int = 10
    t_end: float = 0.75
    seed: int = 0
    seeds: int = 2  # the demo's; ``sparsekern bench e2e`` runs 3

    @classmethod
    def quick(cls, **overrides) -> WideConfig:
        base = dict(hidden=256, epochs=3, delta_t=3, seeds=1)
        base.update(overrides)
        return cls(**base)

    def check(self, fn: str, names: Callable[[str], str] = str) -> WideConfig:
        """Raise ValueError for any value the run cannot use, naming the field as ``names(field)`` (the command
        line passes its option names); returns self."""
        _check_run_fields(self, fn, names)
        if round((1 - self.sparsity) * self.hidden * self.hidden) < 1:
            raise ValueError(
                f"{fn}: {names('sparsity')} {self.sparsity} leaves no nonzero in a {self.hidden}x{self.hidden} layer"
            )
        return self

    @property
    def sparse_layer(self) -> str:
        return "2"  # make_mlp's hidden x hidden Linear

    def describe(self) -> str:
        h = self.hidden
        return (
            f"MLP 64-{h}-{h}-10, B={self.batch}, {self.epochs} epochs, the {h}x{h} layer at {self.sparsity:.0%} "
            f"sparsity (uniform random start; 64x{h} and {h}x10 dense), SGD lr {self.lr} cosine, "
            f"RigL ΔT={self.delta_t} steps until {self.t_end:.0%} of the run ({self.mask_updates()} mask updates, "
            "α=0.3)"
        )

    def mask_updates(self) -> int:
        """The mask updates of one run: every ``delta_t`` optimizer steps before ``t_end``."""
        from .schedule import UpdateSchedule

        total = math.ceil(len(load_split(self.seed)[1]) / self.batch) * self.epochs
        schedule = UpdateSchedule(total, self.delta_t, t_end=self.t_end)
        return sum(schedule.is_update(t) for t in range(1, total + 1))


@dataclass
class WideRun:
    """One training run of the wide comparison."""

    method: str
    seed: int
    epoch_s: list[float]  # training seconds of each epoch (steps only, the test evaluation excluded)
    curve: list[float]  # test accuracy (%) after each epoch
    report: dict | None = None  # sparsity_report of the trained model (None: dense)
    mask_moved: float | None = None  # share of the initial nonzeros no longer active at the end (RigL)
    mask_updates: int = 0  # RigL steps that moved the masks
    update_s: float = 0.0  # seconds in the RigL steps that moved the masks (plan and commit), all epochs

    @property
    def update_s_per_epoch(self) -> float:
        return self.update_s / len(self.epoch_s)

    @property
    def s_per_epoch(self) -> float:
        return float(np.mean(self.epoch_s))


class _WideTrainer:
    """One run of the wide comparison, trained an epoch at a time (so the runs of a seed can take turns)."""

    def __init__(self, method: str, cfg: WideConfig, seed: int, data, isa: str | None = None):
        from . import RigL, sparsify

        self.isa = isa  # the sparse kernels' instruction set for this run (None: as the process has it)
        self.model = make_mlp(cfg.hidden, seed)
        self.held: dict = {}
        factory = None
        if method != "dense":
            layout = "sparse" if method == "rigl-sparse" else "masked"
            generator = torch.Generator().manual_seed(seed)  # same mask and weights for both layouts
            sparsify(self.model, cfg.sparsity, distribution="uniform", include=cfg.sparse_layer, layout=layout,
                     generator=generator, rescale=True)  # fmt: skip

            def factory(m, o, total):
                self.held["rigl"] = RigL(m, o, total_steps=total, delta_t=cfg.delta_t, t_end=cfg.t_end)
                self.held["start"] = self.held["rigl"].state_dict()["active"]
                return self.held["rigl"]

        self.update_s: list[float] = []
        run_cfg = dataclasses.replace(cfg, seed=seed)
        self.epochs = epochs(self.model, data, run_cfg, sparsifier_factory=factory, update_s=self.update_s)
        self.run = WideRun(method, seed, [], [])

    def epoch(self) -> None:
        if self.isa is None:
            seconds, acc = next(self.epochs)
        else:
            from .._extension import use_cpu_isa

            with use_cpu_isa(self.isa):
                seconds, acc = next(self.epochs)
        self.run.epoch_s.append(seconds)
        self.run.curve.append(acc)

    def finish(self) -> WideRun:
        from . import sparsity_report

        run = self.run
        run.update_s, run.mask_updates = sum(self.update_s), len(self.update_s)
        if "rigl" in self.held:
            run.report = sparsity_report(self.model).to_dict()
            start, end = self.held["start"], self.held["rigl"].state_dict()["active"]
            kept = sum(int(torch.isin(start[name], end[name]).sum()) for name in end)
            run.mask_moved = 1.0 - kept / sum(a.numel() for a in start.values())
            self.held["rigl"].remove()
        return run


def _wide_run(method: str, cfg: WideConfig, seed: int, data, isa: str | None = None) -> WideRun:
    """One run of ``method`` on its own."""
    trainer = _WideTrainer(method, cfg, seed, data, isa)
    for _ in range(cfg.epochs):
        trainer.epoch()
    return trainer.finish()


@dataclass
class WideResult:
    """One method of the wide comparison over the seeds."""

    method: str
    runs: list[WideRun]
    speedups: list[float]  # dense s/epoch over this method's, per seed (runs taking turns epoch by epoch)
    isa: str | None = None  # rigl-sparse: the instruction set its kernels ran

    @property
    def label(self) -> str:
        return WIDE_LAYOUT[self.method] + (f" ({self.isa})" if self.isa else "")

    @property
    def accuracies(self) -> list[float]:
        return [r.curve[-1] for r in self.runs]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def accuracy_sd(self) -> float:
        return float(np.std(self.accuracies)) if len(self.runs) > 1 else 0.0

    @property
    def s_per_epoch(self) -> float:
        return float(np.median([r.s_per_epoch for r in self.runs]))

    @property
    def update_s_per_epoch(self) -> float:
        return float(np.median([r.update_s_per_epoch for r in self.runs]))

    @property
    def speedup(self) -> float:
        return float(np.median(self.speedups))

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "layout": WIDE_LAYOUT[self.method],
            "isa": self.isa,
            "s_per_epoch": self.s_per_epoch,
            "speedup_vs_dense": self.speedup,
            "speedups": self.speedups,
            "accuracy": self.accuracy,
            "accuracy_sd": self.accuracy_sd,
            "accuracies": self.accuracies,
            "update_s_per_epoch": self.update_s_per_epoch,
            "runs": [dataclasses.asdict(r) | {"s_per_epoch": r.s_per_epoch} for r in self.runs],
        }


def run_wide(cfg: WideConfig, *, isas: Sequence[str | None] = (None,), echo=print) -> list[WideResult]:
    """Train the wide MLP dense, with RigL on masked weights and with RigL on SparseLinear (once per entry of
    ``isas``: the sparse kernels' instruction set, None for the process's), for each seed; the runs of a seed
    take turns epoch by epoch, so a slow spell of a shared machine hits every method. One :class:`WideResult`
    per method and ISA: dense, rigl-masked, then rigl-sparse per ISA."""
    from tqdm.auto import tqdm

    cfg.check("run_wide")
    if not isas:
        raise ValueError("run_wide: isas must name at least one instruction set (None: the process's)")
    keys = [("dense", None), ("rigl-masked", None)]
    keys += [("rigl-sparse", isa if isa is not None else sparse_kernels()) for isa in isas]
    given = [None, None, *isas]  # the ISA each run forces (None: the process's)
    runs: dict[tuple, list[WideRun]] = {key: [] for key in keys}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        data = load_split(seed)
        # the runs of a seed take turns epoch by epoch, so a slow spell of a shared machine hits every method
        trainers = [_WideTrainer(m, cfg, seed, data, isa) for (m, _), isa in zip(keys, given, strict=True)]
        with tqdm(total=cfg.epochs * len(keys), desc=f"wide MLP seed {seed}", leave=False, unit="epoch") as bar:
            for _ in range(cfg.epochs):
                for trainer in trainers:
                    trainer.epoch()
                    bar.update()
        for (method, isa), trainer in zip(keys, trainers, strict=True):
            run = trainer.finish()
            runs[method, isa].append(run)
            name = f"{method} ({isa})" if isa else method
            echo(f"  wide {name} seed {seed}: {run.s_per_epoch:.3f} s/epoch, {run.curve[-1]:.2f}%")
    dense = [r.s_per_epoch for r in runs["dense", None]]
    return [
        WideResult(method, rs, [d / r.s_per_epoch for d, r in zip(dense, rs, strict=True)], isa)
        for (method, isa), rs in runs.items()
    ]


def wide_goal(results: list[WideResult]) -> list[str]:
    """The DESIGN §6 end-to-end goal, judged on this run: lines of text."""
    masked = next(r for r in results if r.method == "rigl-masked")
    lines = []
    for sparse in (r for r in results if r.method == "rigl-sparse"):
        speed = "met" if sparse.speedup >= GOAL_SPEEDUP else "NOT met"
        lines.append(
            f"goal ({sparse.isa}): RigL on SparseLinear >= {GOAL_SPEEDUP:g}x dense per epoch: {sparse.speedup:.2f}x, "
            f"{speed}"
        )
        if len(masked.runs) < 2:
            lines.append(f"goal ({sparse.isa}): accuracy within the seeds' spread of RigL on masked weights: needs 2 "
                         "or more seeds")  # fmt: skip
            continue
        # the spread: the range of the per-seed accuracies of either RigL run
        spread = max(max(r.accuracies) - min(r.accuracies) for r in (sparse, masked))
        gap = abs(sparse.accuracy - masked.accuracy)
        lines.append(
            f"goal ({sparse.isa}): accuracy within the seeds' spread of RigL on masked weights: mean gap {gap:.2f} "
            f"points, spread (range over seeds) {spread:.2f}, {'met' if gap <= spread else 'NOT met'}"
        )
    layer = masked.runs[0].report["layers"][0]
    if layer["shape"] != [GOAL_WIDTH, GOAL_WIDTH] or round(layer["sparsity"], 3) != GOAL_SPARSITY:
        n_out, n_in = layer["shape"]
        lines.append(
            f"(the goal is set for the {GOAL_WIDTH}x{GOAL_WIDTH} layer at {GOAL_SPARSITY:.0%}; this run's "
            f"{n_out}x{n_in} at {layer['sparsity']:.0%} only shows the figures)"
        )
    return lines


def format_wide_table(results: list[WideResult]) -> str:
    head = ["method", "layers", "s/epoch", "updates s/epoch", "vs dense", "test acc %", "sp hidden", "masks moved"]
    rows = [head]
    for r in results:
        spread = f" ({min(r.speedups):.2f}-{max(r.speedups):.2f})" if len(r.speedups) > 1 else ""
        first = r.runs[0]
        hidden = next((layer for layer in (first.report or {}).get("layers", [])), None)
        rows.append([
            r.method,
            r.label,
            f"{r.s_per_epoch:.3f}",
            f"{r.update_s_per_epoch:.3f}" if first.report else "",
            f"{r.speedup:.2f}x{spread}",
            f"{r.accuracy:.2f} ± {r.accuracy_sd:.2f}",
            f"{hidden['sparsity']:.4f}" if hidden else "0",
            f"{np.mean([x.mask_moved for x in r.runs]):.1%}" if first.mask_moved is not None else "",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def wide_section(cfg: WideConfig, results: list[WideResult]) -> tuple[str, dict]:
    """The printed section (title, table, notes, goal lines) and its JSON."""
    seeds = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}"
    text = "\n".join([
        f"wide MLP, where the sparse layers pay off: {cfg.describe()}; {seeds}",
        format_wide_table(results),
        "s/epoch: training time per epoch (the steps of all epochs, mask updates included, test evaluation "
        "excluded; median over the seeds); updates s/epoch: the part of it in RigL's mask updates (the optimizer "
        "steps that plan and apply new masks); vs dense: dense s/epoch over the method's, per seed (median, range); "
        "test acc: final, mean ± sd over the seeds; masks moved: share of the initial nonzeros gone at the end",
        *wide_goal(results),
    ])  # fmt: skip
    data = {
        "config": dataclasses.asdict(cfg),
        "description": cfg.describe(),
        "isa": _isa(),
        "results": [r.to_dict() for r in results],
        "goal": wide_goal(results),
    }
    return text, data


def plot(results: list[Result], path: Path, cfg: Config, wide: list[WideResult] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if wide:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    else:
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
    if wide:
        names = [r.method + (f"\n{r.isa}" if r.isa else "") for r in wide]
        colors = ["0.6", "tab:orange", *["tab:green"] * (len(wide) - 2)]
        bars = bx.bar(names, [r.s_per_epoch for r in wide], color=colors)
        for bar, r in zip(bars, wide, strict=True):
            bx.annotate(f"{r.speedup:.2f}x, {r.accuracy:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)  # fmt: skip
        bx.set_ylabel("training s per epoch (lower is faster)")
        layer = next(r.runs[0].report["layers"][0] for r in wide if r.runs[0].report)
        n_out, n_in = layer["shape"]
        bx.set_title(f"wide MLP 64-{n_in}-{n_out}-10, {n_in}x{n_out} at {layer['sparsity']:.0%}:\n"
                     "s per epoch (speedup vs dense, test accuracy)", fontsize=10)  # fmt: skip
        bx.margins(y=0.15)
        bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kernels() -> str:
    isa = sparse_kernels()
    return "the plain-PyTorch reference (no extension)" if isa == "reference" else f"the C++ kernels ({isa})"


def sparse_kernels() -> str:
    """What SparseLinear runs now: the C++ kernels' ISA ("avx512", "avx2", "baseline") or "reference"."""
    from .. import _extension

    return _extension.cpu_isa() if _extension.available() else "reference"


def _isa() -> dict:
    """The CPU and the instruction set the sparse kernels run, for the results."""
    import os

    from .. import _extension
    from ..bench.harness import cpu_name

    return {
        "cpu": cpu_name(),
        "cpu_isa": _extension.cpu_isa(),
        "forced_by_env": os.environ.get("SPARSEKERN_CPU_ISA"),
        "threads": torch.get_num_threads(),
    }


def _starts(methods: Sequence[str]) -> str:
    """How the run's sparse methods choose their masks, naming only the methods in it."""
    named = {"snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "imp": "IMP"}
    parts = ["ERK"]
    scored = [named[m] for m in methods if m in named]
    if scored:
        parts.append(f"{', '.join(scored)}: global")
    if "gmp" in methods:
        parts.append("GMP: dense to ERK")
    if "rigl_fan_in" in methods:
        parts.append("RigL fan-in: ERK, equal rows")
    if "srste" in methods or "rigl_2:4" in methods:
        parts.append(f"{', '.join(n for m, n in (('rigl_2:4', 'RigL 2:4'), ('srste', 'SR-STE')) if m in methods)}: 2:4")
    return "; ".join(parts)


def run_demo(
    cfg: Config, out: Path, *, make_plot: bool = True, echo=print, wide: WideConfig | None = None
) -> tuple[list[Result], list[WideResult] | None]:
    """The demo: every method on the small MLP (``cfg``), then, unless ``wide`` is None, the wide-MLP comparison.
    Prints the tables, writes ``out/results.json`` (and ``out/accuracy.png``); returns both results."""
    cfg.check("sparsekern demo")
    if wide is not None:
        wide.check("sparsekern demo")
    out = Path(out)
    check_out_dir("sparsekern demo", out, OUT_FILES)
    if make_plot:
        check_plot("sparsekern demo")
    data = load_split(cfg.seed)
    seeds = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}, mean ± sd"
    isa = _isa()
    echo(
        f"UCI digits: {len(data[1])} train / {len(data[3])} test images; MLP 64-{cfg.hidden}-{cfg.hidden}-10; "
        f"sparsity {cfg.sparsity:.0%} ({_starts(cfg.methods)}); "
        f"{cfg.epochs} epochs; {seeds}; "
        f"{torch.get_num_threads()} threads on {isa['cpu']}; sparse layers on {_kernels()}"
    )
    results = []
    for method in cfg.methods:
        results.append(run_seeds(method, cfg))
        echo(f"  {method}: {results[-1].accuracy:.2f}% ({results[-1].wall_s:.1f}s per run)")
    table = format_table(results)
    echo(table)
    echo(
        "train/infer FLOPs: training and inference FLOPs over the dense model's, counted as the RigL paper does "
        "(forward = Σ nnz·positions of the weight layers, backward 2x forward; RigL: a dense gradient every ΔT "
        "steps; SNFS, STE, SR-STE: a dense weight gradient every step; GMP: summed over its pruning schedule; IMP: "
        "all its rounds, each a full run; small-dense: the narrow model's FLOPs); mean over the seeds. "
        "wall s: training time of one run (IMP: all its rounds). layers ms/batch: forward+backward of the Linear "
        f"layers alone for one batch of {cfg.batch} (SparseLinear for the sparse methods; median of 20); "
        "vs dense below 1x means the sparse layers are faster"
        + (": at this size they are not, see the wide MLP below" if wide is not None else "")
    )
    for line in structured_notes(results):
        echo(line)
    payload = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernels": _kernels(),
        "isa": isa,
        "results": [{**r.__dict__, "accuracy_sd": r.accuracy_sd} for r in results],
        "wide": None,
    }
    wide_results = None
    if wide is not None:
        echo("")
        wide_results = run_wide(wide, echo=echo)
        text, payload["wide"] = wide_section(wide, wide_results)
        echo(text)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    echo(f"wrote {out / 'results.json'}")
    if make_plot:
        plot(results, out / "accuracy.png", cfg, wide_results)
        echo(f"wrote {out / 'accuracy.png'}")
    return results, wide_results


def add_wide_arguments(parser, prefix: str = "", seeds: bool = True) -> None:
    """The wide-MLP options: ``--wide-hidden`` etc. in the demo (``prefix="wide-"``), ``--hidden`` etc. in
    ``sparsekern bench e2e`` (whose shared ``--repeat`` is the seeds: ``seeds=False``)."""
    d = WideConfig()
    parser.add_argument(f"--{prefix}hidden", type=int, default=None, help=f"hidden width (default {d.hidden})")
    parser.add_argument(f"--{prefix}sparsity", type=float, default=None,
                        help=f"sparsity of the hidden x hidden layer (default {d.sparsity})")  # fmt: skip
    parser.add_argument(f"--{prefix}epochs", type=int, default=None, help=f"epochs per run (default {d.epochs})")
    if seeds:
        parser.add_argument(f"--{prefix}seeds", type=int, default=None,
                            help=f"runs per method, from --seed on (default {d.seeds})")  # fmt: skip
    parser.add_argument(f"--{prefix}delta-t", type=int, default=None,
                        help=f"RigL's steps between mask updates (default {d.delta_t})")  # fmt: skip


def wide_config(args: argparse.Namespace, fn: str, prefix: str = "") -> WideConfig:
    """The :class:`WideConfig` from parsed :func:`add_wide_arguments` options (``--quick``: the small variant)."""
    overrides = {"seed": args.seed}
    for name in ("hidden", "sparsity", "epochs", "seeds", "delta_t"):
        value = getattr(args, prefix.replace("-", "_") + name)
        if value is not None:
            overrides[name] = value
    cfg = WideConfig.quick(**overrides) if args.quick else WideConfig(**overrides)
    try:
        return cfg.check(fn, lambda name: f"--{prefix}{name.replace('_', '-')}")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def set_threads(fn: str, threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"{fn}: --threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    d = Config()
    parser.add_argument("--sparsity", type=float, default=d.sparsity, help="target sparsity (default 0.9)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {d.epochs})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden width (default {d.hidden})")
    parser.add_argument("--seed", type=int, default=d.seed, help="first seed")
    parser.add_argument("--seeds", type=int, default=None, help=f"runs per method, averaged (default {d.seeds})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    methods = f"comma-separated subset of {','.join(METHODS)}, or all (default {','.join(DEFAULT_METHODS)})"
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=methods)
    parser.add_argument("--out", type=Path, default=Path("sparsekern-demo"), help="output folder (JSON, PNG)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run (small MLPs, few epochs)")
    parser.add_argument(
        "--no-wide",
        action="store_true",
        help="skip the wide-MLP section (64-4096-4096-10: dense vs RigL masked vs RigL SparseLinear)",
    )
    add_wide_arguments(parser.add_argument_group("wide MLP section"), prefix="wide-")


def demo_main(args: argparse.Namespace) -> int:
    """Check every option and the output folder, then run; a bad value exits at once with a message naming
    its option, before any training."""
    fn = "sparsekern demo"
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    methods = METHODS if methods == ("all",) else methods
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"{fn}: --methods must name some of {','.join(METHODS)} (or all), got {args.methods!r}")
    overrides = {"sparsity": args.sparsity, "seed": args.seed, "methods": methods}
    for name in ("epochs", "hidden", "seeds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = Config.quick(**overrides) if args.quick else Config(**overrides)
    try:
        cfg.check(fn, lambda name: f"--{name.replace('_', '-')}")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    wide = None if args.no_wide else wide_config(args, fn, prefix="wide-")
    set_threads(fn, args.threads)
    try:
        check_out_dir(fn, args.out, OUT_FILES, name="--out")
        if not args.no_plot:
            check_plot(fn)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    run_demo(cfg, args.out, make_plot=not args.no_plot, wide=wide)
    return 0
