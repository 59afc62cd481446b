"""``sparsekern tickets``: the lottery-ticket experiments of issue 14 on the embedded UCI digits.

IMP with a fixed 20% prune per round to a high final sparsity, each level's ticket against its random
re-initialisation control (``IMP.control(level, "reinit")``) over several seeds, IMP with Paul et al.'s adaptive
ratio to the same sparsity (rounds, accuracy and sweep cost against the fixed 20%), the instability sweep over rewind
points k (:func:`sparsekern.tickets.instability`) and the linear connectivity of the IMP levels
(:func:`sparsekern.tickets.level_connectivity`). The data, the MLP and the training loop are the demo's
(:mod:`sparsekern.training.demo`). Prints a table and what was found; writes JSON and PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..training import demo
from .instability import instability
from .levels import level_connectivity

FN = "sparsekern tickets"
OUT_FILES = ("tickets.json", "tickets.png", "level_path.png", "level_barriers.png")
PRUNE_FRACTION = 0.2  # the papers' fixed ratio (Frankle & Carbin; Paul et al.'s baseline)
ADAPTIVE_SAMPLES = 512  # the adaptive ratio's fixed subsample of the training split (of 1438 images)


@dataclass
class TicketsConfig:
    """The run: ``train`` is the demo's :class:`~sparsekern.training.demo.Config` (its ``epochs`` are per IMP round
    and per control run, its ``sparsity`` the final one); the rest is this experiment's."""

    train: demo.Config
    rewind_step: int = 0  # IMP's rewind point, in optimizer steps of round 0 (0: the original lottery ticket)
    instability_epochs: tuple[int, ...] = (0, 1, 2, 4)  # rewind points k of the sweep, in epochs of dense training
    instability_seeds: tuple[int, int] = (101, 102)  # the two data orders trained from each w_k
    match_tol: float = 1.0  # a level "matches" when its mean accuracy is at least dense's minus this (points)

    @classmethod
    def default(cls, **train) -> TicketsConfig:
        # 0.8**18 = 0.018: 18 prunes to 98%, where the digits' tickets start to fall off; 12 epochs a round keeps
        # the default run at about 2 minutes on one thread
        base = dict(sparsity=0.98, hidden=128, epochs=12, seeds=3, imp_prune_fraction=PRUNE_FRACTION, methods=("imp",))
        return cls(demo.Config(**{**base, **train}))

    @classmethod
    def quick(cls, **train) -> TicketsConfig:
        base = dict(sparsity=0.8, hidden=32, epochs=2, seeds=1, imp_prune_fraction=PRUNE_FRACTION, methods=("imp",))
        return cls(demo.Config(**{**base, **train}), instability_epochs=(0, 1))

    def check(self, names=lambda name: f"--{name.replace('_', '-')}") -> TicketsConfig:
        """Raise ValueError for any value the run cannot use (before any training), naming its option."""
        self.train.check(FN, names)
        step = self.rewind_step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{FN}: {names('rewind_step')} must be an int >= 0, got {step!r}")
        steps = math.ceil(len(demo.load_split(0)[1]) / self.train.batch) * self.train.epochs  # round 0's steps
        if step > steps:
            raise ValueError(f"{FN}: {names('rewind_step')} must be at most round 0's {steps} steps, got {step}")
        ks = self.instability_epochs
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.train.epochs for k in ks):
            raise ValueError(
                f"{FN}: {names('instability_epochs')} must be epochs in [0, {self.train.epochs}) (below --epochs), "
                f"got {ks!r}"
            )
        if not 0 < self.match_tol < 100:
            raise ValueError(f"{FN}: {names('match_tol')} must lie in (0, 100) accuracy points, got {self.match_tol!r}")
        return self


def _train_ticket(ticket, data, cfg: demo.Config, desc: str) -> float:
    """Train a :class:`~sparsekern.training.imp.Ticket` exactly as an IMP round (the demo's loop); test accuracy."""
    curve = demo.train(ticket.model, data, cfg, sparsifier_factory=lambda m, o, total: ticket.start(o), desc=desc)
    return curve[-1]


def _run_imp(imp, model, data, train: demo.Config, desc: str) -> tuple[list, list, list, list]:
    """Every round of ``imp`` with the demo's loop: per level the test accuracy, the sparsity, the level solution
    (state_dict after the round's training, before end_round prunes and rewinds) and the round's record. Round 0
    reports its last epoch's batch losses (``train_losses``, the adaptive ratio's epsilon)."""
    acc, sparsity, solutions, rounds = [], [], [], []
    per_epoch = math.ceil(len(data[1]) / train.batch)
    while not imp.done:
        losses = []
        factory = lambda m, o, total: imp.start_round(o)  # noqa: E731
        acc.append(
            demo.train(model, data, train, sparsifier_factory=factory, desc=f"{desc} {imp.round}", losses=losses)[-1]
        )
        solutions.append(copy.deepcopy(model.state_dict()))
        row = imp.end_round(accuracy=acc[-1], **({"train_losses": losses[-per_epoch:]} if imp.round == 0 else {}))
        sparsity.append(row.report.sparsity)
        rounds.append(row)
    return acc, sparsity, solutions, rounds


def run_seed(cfg: TicketsConfig, seed: int) -> dict:
    """One seed: IMP (its own split and init), then the reinit control of every level, then IMP with the adaptive
    ratio from the same init to the same final sparsity. Returns per-level accuracies, sparsities and the level
    solutions (state_dicts after each round's training), and the adaptive run's rounds."""
    from ..training import IMP

    train = dataclasses.replace(cfg.train, seed=seed)
    data = demo.load_split(seed)
    model = demo.make_mlp(train.hidden, seed)
    imp = IMP(model, train.sparsity, prune_fraction=PRUNE_FRACTION, rewind_step=cfg.rewind_step, layout="masked")
    ticket_acc, sparsity, solutions, _ = _run_imp(imp, model, data, train, f"seed {seed} IMP level")
    reinit_acc = [None] + [
        _train_ticket(imp.control(level, "reinit", seed=seed), data, train, f"seed {seed} reinit level {level}")
        for level in range(1, imp.levels)
    ]
    return {
        "seed": seed,
        "sparsity": sparsity,
        "ticket": ticket_acc,
        "reinit": reinit_acc,
        "adaptive": run_adaptive(cfg, seed, data),
        "solutions": solutions,
        "model": model,
    }


def run_adaptive(cfg: TicketsConfig, seed: int, data) -> dict:
    """IMP with Paul et al.'s adaptive ratio (floor: the fixed 20%) from the seed's init to the same final sparsity;
    the sweep's loss is taken on a fixed subsample of ``ADAPTIVE_SAMPLES`` training images (drawn from ``seed``).
    Returns per level the accuracy and sparsity, and per prune p* (the largest ratio whose path stayed below the
    threshold), the fraction pruned and the sweep's forward passes."""
    from ..training import IMP

    train = dataclasses.replace(cfg.train, seed=seed)
    x, y = data[0], data[1]
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:ADAPTIVE_SAMPLES]
    model = demo.make_mlp(train.hidden, seed)
    imp = IMP(model, train.sparsity, prune_fraction=PRUNE_FRACTION, rewind_step=cfg.rewind_step, layout="masked",
              seed=seed, adaptive=True, adaptive_data=(x[pick], y[pick]))  # fmt: skip
    acc, sparsity, _, rounds = _run_imp(imp, model, data, train, f"seed {seed} adaptive IMP level")
    prunes = [row.adaptive for row in rounds if row.adaptive is not None]
    return {
        "ticket": acc,
        "sparsity": sparsity,
        "epsilon": prunes[0]["epsilon"] if prunes else None,
        "p_star": [p["ratio"] for p in prunes],
        "pruned": [p["pruned"] for p in prunes],
        "forward_passes": [p["forward_passes"] for p in prunes],
    }


def run_instability(cfg: TicketsConfig) -> list[dict]:
    """Frankle et al. 2020's sweep on the dense MLP: w_k after k epochs of training (seed ``cfg.train.seed``), then
    two copies trained from w_k with different data orders, and the test-error barrier between them. Each copy
    trains ``epochs`` epochs from w_k with the cosine schedule from its start (not the remaining T - k steps)."""
    train = cfg.train
    data = demo.load_split(train.seed)
    model = demo.make_mlp(train.hidden, train.seed)
    points = {0: copy.deepcopy(model.state_dict())}
    run = demo.epochs(model, data, train)  # one epoch per next(): stop at the last k, training no further
    for epoch in range(1, max(cfg.instability_epochs) + 1):
        next(run)
        points[epoch] = copy.deepcopy(model.state_dict())

    def train_fn(network, seed):
        demo.train(network, data, dataclasses.replace(train, seed=seed), desc=f"instability copy {seed}")

    rows = []
    for k in sorted(set(cfg.instability_epochs)):
        result = instability(
            model, train_fn, rewind_state=points[k], seeds=cfg.instability_seeds, data=(data[2], data[3])
        )
        rows.append({"k_epochs": k, "k_steps": k * -(-len(data[1]) // train.batch), **result.to_dict()})
    return rows


def _mean_sd(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


def summarize_adaptive(runs: list[dict]) -> tuple[list[str], dict]:
    """Adaptive vs fixed 20% per seed (prunes to the final sparsity, final accuracy, sweep cost, p* per prune) and
    whether the adaptive ratio reached the same sparsity in fewer prunes with the final accuracy within the seeds'
    spread (the larger range of the two runs' final accuracies over the seeds): Paul et al.'s 7 instead of 11."""
    seeds = []
    for r in runs:
        a = r["adaptive"]
        seeds.append({"seed": r["seed"], "prunes_fixed": len(r["ticket"]) - 1, "prunes_adaptive": len(a["ticket"]) - 1,
                      "accuracy_fixed": r["ticket"][-1], "accuracy_adaptive": a["ticket"][-1],
                      "sparsity_fixed": r["sparsity"][-1], "sparsity_adaptive": a["sparsity"][-1],
                      "forward_passes": int(sum(a["forward_passes"])), "p_star": a["p_star"],
                      "pruned": a["pruned"]})  # fmt: skip
    fixed = [s["accuracy_fixed"] for s in seeds]
    adaptive = [s["accuracy_adaptive"] for s in seeds]
    same_sparsity = all(abs(s["sparsity_adaptive"] - s["sparsity_fixed"]) < 1e-3 for s in seeds)
    fewer = all(s["prunes_adaptive"] < s["prunes_fixed"] for s in seeds)
    spread = max(max(fixed) - min(fixed), max(adaptive) - min(adaptive)) if len(seeds) > 1 else None
    gap = float(np.mean(adaptive) - np.mean(fixed))
    within = None if spread is None else gap >= -spread  # higher accuracy is no disagreement
    agrees = None if within is None else same_sparsity and fewer and within
    lines = [f"{'seed':>5} {'prunes fixed':>12} {'prunes adapt':>12} {'acc fixed %':>11} {'acc adapt %':>11} "
             f"{'sweep fwd':>9}  p* per prune"]  # fmt: skip
    for s in seeds:
        lines.append(
            f"{s['seed']:>5} {s['prunes_fixed']:>12} {s['prunes_adaptive']:>12} {s['accuracy_fixed']:>11.2f} "
            f"{s['accuracy_adaptive']:>11.2f} {s['forward_passes']:>9}  {' '.join(f'{p:.1f}' for p in s['p_star'])}"
        )
    head = (
        f"adaptive ratio ({len(seeds)} seeds): {'every' if fewer else 'NOT every'} seed reached the final sparsity in "
        f"fewer prunes than 20% per round"
        + ("" if same_sparsity else " (and NOT every adaptive run ended at the same sparsity)")
        + f"; final accuracy {gap:+.2f} points vs fixed"
    )
    if agrees is None:
        verdict = "one seed: no spread to judge the accuracy against, so no verdict on Paul et al."
    elif agrees:
        verdict = f"within the seeds' spread ({spread:.2f} points): agrees with Paul et al. (7 instead of 11 rounds)"
    else:
        verdict = f"seeds' spread {spread:.2f} points: does NOT agree with Paul et al. (7 instead of 11 rounds)"
    lines.append(f"{head}; {verdict}")
    found = {"seeds": seeds, "same_sparsity": same_sparsity, "fewer_prunes": fewer, "accuracy_gap": gap,
             "spread": spread, "within_spread": within, "agrees_with_papers": agrees}  # fmt: skip
    return lines, found


def summarize(cfg: TicketsConfig, runs: list[dict], levels, stability: list[dict]) -> tuple[str, dict]:
    """The table per level and the findings on the issue's targets, as text and as a dict."""
    n = len(runs[0]["ticket"])
    rows = []
    for level in range(n):
        ticket = _mean_sd([r["ticket"][level] for r in runs])
        reinit = None if level == 0 else _mean_sd([r["reinit"][level] for r in runs])
        rows.append({"level": level, "sparsity": runs[0]["sparsity"][level], "ticket": ticket, "reinit": reinit})
    # matching is judged on the run whose levels the connectivity measures (the first seed), as Paul et al. do
    first = runs[0]["ticket"]
    matching = [acc >= first[0] - cfg.match_tol for acc in first]
    seed = runs[0]["seed"]
    barrier = levels.barriers(reference="linear")
    successive = [barrier[i][i + 1] for i in range(n - 1)]
    lines = [
        f"{'level':>5} {'sparsity':>8} {'rewind acc %':>14} {'reinit acc %':>14} {f'match s{seed}':>8} "
        f"{'barrier→next':>12}"
    ]
    for row, match, b in zip(rows, matching, successive + [None], strict=True):
        reinit = "-" if row["reinit"] is None else f"{row['reinit'][0]:6.2f} ± {row['reinit'][1]:4.2f}"
        nxt = "-" if b is None else f"{100 * b:.2f}"
        lines.append(
            f"{row['level']:>5} {row['sparsity']:>8.3f} {row['ticket'][0]:6.2f} ± {row['ticket'][1]:4.2f} "
            f"{reinit:>14} {'yes' if match else 'no':>8} {nxt:>12}"
        )

    findings = {}
    high = [row for row in rows[1:] if row["sparsity"] >= 0.95]
    if high:
        wins = sum(row["ticket"][0] > row["reinit"][0] for row in high)
        gap = float(np.mean([row["ticket"][0] - row["reinit"][0] for row in high]))
        agree = wins == len(high)
        findings["rewind_vs_reinit"] = {"levels": [row["level"] for row in high], "wins": wins, "mean_gap": gap,
                                        "agrees_with_papers": agree}  # fmt: skip
        text = (
            f"rewinding vs random re-init at >= 95% sparsity ({len(runs)} seeds): the rewound ticket is more accurate "
            f"at {wins} of {len(high)} levels, by {gap:+.2f} points on average: "
            + ("agrees with Frankle & Carbin" if agree else "does NOT fully agree with Frankle & Carbin")
        )
    else:
        findings["rewind_vs_reinit"] = None
        text = "rewinding vs random re-init: no level reached 95% sparsity (raise --sparsity); target not tested"
    # level 0 matches itself, so stop is None or >= 1; "before" are the segments between levels 0..stop-1
    stop = next((level for level, match in enumerate(matching) if not match), None)
    before = successive if stop is None else successive[: stop - 1]
    at_stop = None if stop is None else successive[stop - 1]
    findings["levels"] = {"last_matching": n - 1 if stop is None else stop - 1, "first_not_matching": stop,
                          "max_barrier_between_matching": max(before) if before else None,
                          "barrier_into_first_not_matching": at_stop}  # fmt: skip
    lines += ["", text]
    if before:
        lines.append(f"barriers between successive matching levels: at most {100 * max(before):.2f} error points")
    if stop is None:
        lines.append(f"every level matches dense (within {cfg.match_tol} points): no level stops matching here")
    else:
        agree = at_stop > max(before) if before else None  # None: no matching pair to compare with
        findings["levels"]["agrees_with_papers"] = agree
        if agree is None:
            verdict = "level 1 already does not match, so there is no matching barrier to compare it with"
        elif agree:
            verdict = "larger than between the matching levels, as Paul et al. report"
        else:
            verdict = "not larger than between the matching levels: does NOT agree with Paul et al."
        lines.append(
            f"level {stop} is the first not matching dense in seed {seed} (within {cfg.match_tol} points); the "
            f"barrier into it is {100 * at_stop:.2f} points: {verdict}"
        )
    ks = ", ".join(f"k={row['k_epochs']} ep: {100 * row['barrier']:.2f}" for row in stability)
    lines.append(f"instability (dense MLP, test-error barrier between two data orders, points): {ks}")
    adaptive_lines, findings["adaptive"] = summarize_adaptive(runs)
    lines += ["", *adaptive_lines]
    return "\n".join(lines), {"table": rows, "matching": matching, "successive_barriers": successive, **findings}


def plot(runs: list[dict], stability: list[dict], path: Path) -> None:
    """Accuracy per level (rewind vs reinit, mean ± sd over the seeds) and the instability barrier against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    sparsity = runs[0]["sparsity"]
    for kind, first in (("ticket", 0), ("reinit", 1)):
        values = np.array([r[kind][first:] for r in runs], dtype=float)
        label = "rewound ticket" if kind == "ticket" else "random re-init"
        left.errorbar(sparsity[first:], values.mean(0), yerr=values.std(0), marker="o", ms=3, capsize=2, label=label)
    left.set_xlabel("sparsity")
    left.set_ylabel("test accuracy (%)")
    left.set_title("IMP levels (20% per round)")
    left.legend()
    left.grid(alpha=0.3)
    right.plot([r["k_epochs"] for r in stability], [100 * r["barrier"] for r in stability], marker="o")
    right.set_xlabel("rewind point k (epochs of dense training)")
    right.set_ylabel("error barrier (%)")
    right.set_title("instability (two data orders)")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_tickets(cfg: TicketsConfig, out: Path, *, make_plot: bool = True, echo=print) -> dict:
    """The whole experiment; writes ``out/tickets.json`` (and the PNGs) and returns the JSON payload."""
    cfg.check()
    out = Path(out)
    demo.check_out_dir(FN, out, OUT_FILES)
    if make_plot:
        demo.check_plot(FN)
    train = cfg.train
    echo(
        f"UCI digits; MLP 64-{train.hidden}-{train.hidden}-10; IMP {PRUNE_FRACTION:.0%} per round to "
        f"{train.sparsity:.1%}, {train.epochs} epochs a round, rewind to step {cfg.rewind_step}; seeds "
        f"{train.seed}..{train.seed + train.seeds - 1}; {torch.get_num_threads()} threads"
    )
    runs = [run_seed(cfg, train.seed + i) for i in range(train.seeds)]
    test = demo.load_split(train.seed)[2:]
    levels = level_connectivity(runs[0]["solutions"], model=runs[0]["model"], data=test, progress=True)
    stability = run_instability(cfg)
    text, found = summarize(cfg, runs, levels, stability)
    echo(text)
    payload = {
        "config": {
            **dataclasses.asdict(cfg.train),
            "rewind_step": cfg.rewind_step,
            "instability_epochs": list(cfg.instability_epochs),
            "match_tol": cfg.match_tol,
            "prune_fraction": PRUNE_FRACTION,
        },  # fmt: skip
        "torch": torch.__version__,
        "seeds": [{k: v for k, v in r.items() if k not in ("solutions", "model")} for r in runs],
        "summary": found,
        "level_connectivity": levels.to_dict(),
        "instability": stability,
        "adaptive": {"subsample": ADAPTIVE_SAMPLES, **found.pop("adaptive")},
    }
    (out / "tickets.json").write_text(json.dumps(payload, indent=2))
    echo(f"wrote {out / 'tickets.json'}")
    if make_plot:
        plot(runs, stability, out / "tickets.png")
        levels.plot(str(out / "level_path.png"), str(out / "level_barriers.png"))
        echo(f"wrote {', '.join(str(out / f) for f in OUT_FILES[1:])}")
    return payload


def add_tickets_arguments(parser: argparse.ArgumentParser) -> None:
    d = TicketsConfig.default()
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run (tiny MLP, 80%%, 1 seed)")
    parser.add_argument("--out", type=Path, default=Path("sparsekern-tickets"), help="output folder (JSON, PNGs)")
    parser.add_argument("--sparsity", type=float, default=None, help=f"final sparsity (default {d.train.sparsity})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per IMP round (default {d.train.epochs})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden width (default {d.train.hidden})")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"IMP runs, each with controls (default {d.train.seeds})"
    )
    parser.add_argument("--rewind-step", type=int, default=d.rewind_step, help="IMP's rewind point (optimizer steps)")
    parser.add_argument("--instability-epochs", default=None,
                        help=f"rewind points k of the sweep, comma-separated epochs (default "
                             f"{','.join(map(str, d.instability_epochs))})")  # fmt: skip
    parser.add_argument("--match-tol", type=float, default=d.match_tol,
                        help="a level matches when within this many accuracy points of dense")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")


def tickets_main(args: argparse.Namespace) -> int:
    """Check every option and the output folder, then run; a bad value exits before any training."""
    train = {
        name: getattr(args, name)
        for name in ("sparsity", "epochs", "hidden", "seeds")
        if getattr(args, name) is not None
    }
    train["seed"] = args.seed
    cfg = TicketsConfig.quick(**train) if args.quick else TicketsConfig.default(**train)
    cfg.rewind_step, cfg.match_tol = args.rewind_step, args.match_tol
    if args.instability_epochs is not None:
        try:
            cfg.instability_epochs = tuple(int(k) for k in args.instability_epochs.split(","))
        except ValueError:
            raise SystemExit(
                f"{FN}: --instability-epochs must be comma-separated ints, got {args.instability_epochs!r}"
            ) from None
    demo.set_threads(FN, args.threads)
    try:
        cfg.check()
        demo.check_out_dir(FN, args.out, OUT_FILES, name="--out")
        if not args.no_plot:
            demo.check_plot(FN)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    run_tickets(cfg, args.out, make_plot=not args.no_plot)
    return 0
