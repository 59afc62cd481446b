"""Iterative magnitude pruning with rewinding (lottery tickets; Frankle & Carbin 2019, Frankle et al. 2020)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .._csr import sorted_contains
from .._distributed import verify_masks_across_ranks
from ..nn.sparse_linear import SparseLinear, TopologyUpdate
from .drop_grow import CompressedLayer, as_layer, flat_mask
from .schedule import MAX_PRUNE_ROUNDS, prune_counts
from .sparsifier import Sparsifier, Static, check_generator_state
from .sparsify import SparsityReport, _unwrap, check_layout, sparse_layers, sparsify, sparsity_report

SCOPES = ("global", "layer")
# the pipeline controls re-run every prune with re-drawn weights or random masks (not the papers' controls: those
# are IMP.control, on one level's actual ticket); the old names warn and map to them
CONTROLS = (None, "reinit_pipeline", "random_pipeline")
_OLD_CONTROLS = {"reinit": "reinit_pipeline", "random_mask": "random_pipeline"}
TICKET_CONTROLS = ("reinit", "random_mask")
REWINDS = ("weights", "lr")
# optimizer hyperparameters that torch's LR schedulers set (OneCycleLR and CyclicLR also cycle momentum or betas)
_SCHEDULED = ("lr", "initial_lr", "max_lr", "min_lr", "momentum", "betas", "base_momentum", "max_momentum")
_TOPOLOGY = ("weight_mask", "row_ptr", "col_idx", "csc_ptr", "csc_row", "csc_perm")  # the masks' buffers
_STATE_KEYS = {"kind", "config", "round", "in_round", "sparsifier", "history", "rewind", "generator", "active"}
ADAPTIVE_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # Paul et al. 2023, section 2.2


@dataclass(frozen=True)
class IMPRound:
    """One round of :class:`IMP`: the sparsity it trained at and the metrics the caller reported."""

    round: int
    report: SparsityReport
    metrics: dict = field(default_factory=dict)
    # with adaptive=True, the prune after the round: epsilon, threshold, sweep (ratio -> max loss on the path),
    # ratio (the largest that stayed below), pruned (the fraction pruned), forward_passes (the sweep's cost)
    adaptive: dict | None = None

    def to_dict(self) -> dict:
        row = {"round": self.round, "sparsity": self.report.sparsity, **self.report.to_dict(), "metrics": self.metrics}
        return row if self.adaptive is None else {**row, "adaptive": self.adaptive}


class _RoundSparsifier(Sparsifier):
    """Static masks; in round 0 it also saves the rewind points after ``rewind_step`` optimizer steps: the weights
    (``rewind="weights"``) right after that step, the learning-rate schedule when the next step begins (the loop has
    stepped its scheduler after the optimizer by then)."""

    flops_rule = "sparse"

    def __init__(self, imp: IMP, model, optimizer, scheduler):
        super().__init__(model, optimizer, group=imp.group)
        self._imp, self.scheduler = imp, scheduler

    def step(self) -> bool:
        imp = self._imp
        if imp.round == 0 and self.steps == imp.rewind_step and imp._lr_point is None:
            imp._save_lr_point(self)
        updated = super().step()
        if imp.round == 0 and self.steps == imp.rewind_step and imp.rewind == "weights":
            imp._save_rewind_point()
        return updated


class IMP:
    """Iterative magnitude pruning with rewinding: train → prune a fraction of the remaining weights by |w| →
    rewind → train again, until the target sparsity. Two rewinds:

    - ``rewind="weights"`` (lottery tickets; Frankle & Carbin 2019, Frankle et al. 2020): the survivors go back
      to their values at step k (``rewind_step``) of round 0: 0 is the original rewind to initialisation, k > 0
      late rewinding. All other parameters and buffers are rewound too.
    - ``rewind="lr"`` (learning-rate rewinding; Renda et al. 2020): the survivors keep their trained values (so do
      the other parameters and buffers), and only the learning-rate schedule is replayed from step k.

    Round 0 trains the dense model (masks all ones); each later round trains the pruned one. The optimizer is reset
    by creating it anew each round (``start_round`` refuses an optimizer that already has state). A learning-rate
    scheduler passed to ``start_round`` (built on that round's optimizer, the same way every round) is replayed
    from step k in every later round, in both modes: its state when step k+1 of round 0 began (so step it after
    ``sparsifier.step()``, as torch asks) is loaded into the new scheduler, and the optimizer's learning rates
    (and the momentum or betas that OneCycleLR and CyclicLR set) are set to their values then; so step j of a
    later round runs at round 0's step k + j rate (train those rounds ``total − k`` steps, as Renda et al.).
    Without a scheduler, ``rewind="lr"`` still restores the learning rates of step k; ``rewind="weights"`` then
    leaves the new optimizer as it is (as before schedulers were taken). The last round prunes to exactly the
    target count.

    Adaptive pruning ratio (Paul et al. 2023, "Unmasking the Lottery Ticket Hypothesis", section 2.2), with
    ``adaptive=True`` and ``adaptive_data=(x, y)`` (training data): round 0 reports the training losses of the
    batches of its last epoch, ``end_round(train_losses=[...])``; their standard deviation is epsilon, and the
    threshold is the dense solution's loss on the subsample plus epsilon. After each round the ratios
    ``adaptive_ratios`` (0.1, 0.2, ..., 0.9) are swept: the level solution is magnitude-pruned (global) by each
    ratio p of its remaining weights, keeping its trained values, and the training loss along the straight path
    from the solution to that pruned version (:func:`sparsekern.tickets.interpolate`, ``adaptive_betas`` points, on
    a random subsample of ``adaptive_subsample`` samples, drawn anew each round from ``seed``) is evaluated. The
    prune removes max(p*, ``prune_fraction``) of the remaining weights, p* the largest ratio whose path stayed at
    or below the threshold (0 if none did), and never goes past the target: the last prune stops exactly at it.
    Every round's :class:`IMPRound` ``.adaptive`` records epsilon, the threshold, the sweep, p*, the fraction
    pruned and the sweep's cost in forward passes (batches of ``adaptive_batch_size``). The number of rounds is not
    known in advance: ``imp.rounds`` is the rounds so far plus the rounds left if every later prune removed
    ``prune_fraction``, updated after every prune (it only shrinks), and exact once the target is reached, so
    ``while imp.round < imp.rounds`` (or ``while not imp.done``) loops work unchanged. Only with
    ``scope="global"`` and ``control=None``.

    Controls as Frankle & Carbin (and facebookresearch/open_lth) run them: :meth:`control` takes a level's actual
    ticket (its masks are kept per level, in :meth:`state_dict` too) and returns a :class:`Ticket`, a separate copy
    of the model to train like that round: ``"reinit"`` keeps the level's masks exactly and draws new weights;
    ``"random_mask"`` places each layer's count of the level at random, with the rewind weights. The
    ``control="reinit_pipeline"`` / ``"random_pipeline"`` options are something else: every prune of the whole run
    re-draws the survivors / places the connections at random, so their masks are not the ticket's.

    Checkpoints: save ``model.state_dict()``, ``optimizer.state_dict()``, the scheduler's and ``imp.state_dict()``
    at any step (in a round or between rounds). To resume, build the model and the IMP as before, load the model's
    state first (it holds the masks and the sizes of SparseLinear layers), then the IMP's; ``start_round`` then
    continues an interrupted round (``sparsifier.steps`` says where) and the optimizer's and scheduler's states are
    loaded after it. The resumed run gives the masks and weights of the run that did not stop.

    Data parallel (DDP): build the model identically on every rank and the IMP on the model itself with ``group=``
    (or on a DDP wrapper when ``layout="masked"``; with "sparse" a wrapper made before IMP would hold the
    Linear layers IMP replaces, so it is refused), and wrap the model anew every round, before the round's
    optimizer. A prune gives each SparseLinear a new, smaller ``values`` parameter that a wrapper from an earlier
    round does not hold: its gradient would not be averaged, and DDP raises "Expected to have finished reduction
    in the prior iteration" on the next step. The new wrapper also broadcasts rank 0's rewound weights. Every
    prune compares checksums of the new masks across the ranks and raises RuntimeError, on every rank and before
    anything changes, if they differ::

        imp = sparsekern.IMP(model, 0.9, layout="sparse", group=torch.distributed.group.WORLD)
        while imp.round < imp.rounds:
            ddp = torch.nn.parallel.DistributedDataParallel(model)   # anew every round
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
            sparsifier = imp.start_round(optimizer)
            ...                                                       # train through ddp, sparsifier.step()
            imp.end_round()

    Args:
        model: a dense model (changed in place; its Linear/Conv1d/Conv2d weights are made sparse, density 1).
        sparsity: the final sparsity in (0, 1).
        prune_fraction: fraction of the remaining weights pruned per round (default 0.2).
        scope: "global" (one magnitude ranking over all layers) or "layer" (each layer pruned by the fraction,
            down to its own ``round((1 - sparsity) * numel)``).
        rewind_step: optimizer steps of round 0 after which the rewind point is saved (0: initialisation).
        rewind: "weights" (default) or "lr" (keep the trained weights; replay the learning-rate schedule).
        control: None, "reinit_pipeline" or "random_pipeline" (with ``rewind="weights"`` only; see above; the old
            names "reinit" and "random_mask" map to them with a FutureWarning: use :meth:`control`).
        layout, include, exclude: as :func:`sparsify` (masked by default: early rounds are nearly dense).
        seed: seeds the controls' random draws (and the adaptive ratio's subsamples).
        adaptive: choose each prune's fraction by the adaptive rule above (``prune_fraction`` is then its floor).
        adaptive_data: the training data for the sweep: an ``(x, y)`` tuple of tensors, or an iterable of
            ``(x, y)`` batches (a list or DataLoader; then ``adaptive_subsample`` must be None).
        adaptive_subsample: evaluate on this many random samples of ``adaptive_data`` (None: all of it).
        adaptive_betas: points on each path (an int n for ``linspace(0, 1, n)``, or increasing betas in [0, 1]).
        adaptive_ratios: the ratios swept, increasing, in (0, 1).
        adaptive_loss_fn: the training loss, ``loss_fn(model(x), y)`` as a batch mean (default cross-entropy).
        adaptive_batch_size: samples per forward pass when ``adaptive_data`` is a tuple.
        group: a ``torch.distributed`` process group (default: the DDP wrapper's, if ``model`` is one).

    Raises:
        ValueError: values out of range or unknown names; a control with ``rewind="lr"``; ``adaptive=True``
            without ``adaptive_data``, with ``scope="layer"`` or a pipeline control, or round 0 ended without
            (at least two) ``train_losses``; ``start_round``/
            ``end_round`` out of order; a scheduler in a later round where round 0 had none, or none where it had
            one; a DDP wrapper with ``layout="sparse"``.
        TypeError: a scheduler that is not a torch LR scheduler of the round's optimizer.
        RuntimeError: ``end_round`` under DDP when the ranks' new masks differ (nothing changes).

    Example (runnable; it stops in round 2 and resumes from the checkpoint)::

        >>> import io, torch, sparsekern
        >>> from torch import nn
        >>> def build():
        ...     torch.manual_seed(0)
        ...     model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        ...     return model, sparsekern.IMP(model, 0.8, prune_fraction=0.4, rewind_step=3)
        >>> def train(model, sparsifier, optimizer, steps):
        ...     for _ in range(steps):
        ...         x = torch.randn(64, 8)
        ...         nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        ...         sparsifier.step()                                   # instead of optimizer.step()
        ...         optimizer.zero_grad()
        >>> model, imp = build()
        >>> while imp.round < imp.rounds:
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # new every round: the reset
        ...     sparsifier = imp.start_round(optimizer)
        ...     if imp.round == 2:
        ...         train(model, sparsifier, optimizer, 5)
        ...         break                                               # interrupted after 5 of 20 steps
        ...     train(model, sparsifier, optimizer, 20)
        ...     _ = imp.end_round(accuracy=0.0)                        # prune and rewind; metrics go in the report
        >>> checkpoint = io.BytesIO()
        >>> torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "imp": imp.state_dict()},
        ...            checkpoint)
        >>> _ = checkpoint.seek(0)
        >>> state = torch.load(checkpoint)                               # e.g. in a new process
        >>> model, imp = build()
        >>> _ = model.load_state_dict(state["model"])                   # first: the masks
        >>> imp.load_state_dict(state["imp"])
        >>> while imp.round < imp.rounds:
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ...     sparsifier = imp.start_round(optimizer)                 # continues round 2 at step 5
        ...     if sparsifier.steps:
        ...         optimizer.load_state_dict(state["optimizer"])
        ...     train(model, sparsifier, optimizer, 20 - sparsifier.steps)
        ...     _ = imp.end_round(accuracy=0.0)
        >>> [row.report.nnz for row in imp.history]
        [320, 192, 115, 69, 64]

    Learning-rate rewinding (Renda et al.) with a torch scheduler: later rounds keep the trained weights and train
    the remaining 20 - 5 steps on round 0's schedule from step 5 (runnable)::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> imp = sparsekern.IMP(model, 0.8, prune_fraction=0.4, rewind="lr", rewind_step=5)
        >>> first_rates = []
        >>> while imp.round < imp.rounds:
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ...     scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        ...     sparsifier = imp.start_round(optimizer, scheduler)          # later rounds: rewound to step 5
        ...     first_rates.append(optimizer.param_groups[0]["lr"])
        ...     for _ in range(20 if imp.round == 0 else 15):
        ...         x = torch.randn(64, 8)
        ...         nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        ...         _ = sparsifier.step()
        ...         scheduler.step()                                        # after the optimizer's step
        ...         optimizer.zero_grad()
        ...     _ = imp.end_round()
        >>> first_rates                                                     # round 0's rate at step 6
        [0.1, 0.05, 0.05, 0.05, 0.05]
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        prune_fraction: float = 0.2,
        scope: str = "global",
        rewind_step: int = 0,
        rewind: str = "weights",
        control: str | None = None,
        layout: str = "masked",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        seed: int = 0,
        group=None,
        adaptive: bool = False,
        adaptive_data=None,
        adaptive_subsample: int | None = None,
        adaptive_betas: int | Iterable[float] = 11,
        adaptive_ratios: Iterable[float] = ADAPTIVE_RATIOS,
        adaptive_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        adaptive_batch_size: int = 1024,
    ):
        fn = "IMP"
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise ValueError(f"{fn}: sparsity must be a number in (0, 1), got {sparsity!r}")
        if (
            isinstance(prune_fraction, bool)
            or not isinstance(prune_fraction, (int, float))
            or not 0 < prune_fraction < 1
        ):
            raise ValueError(f"{fn}: prune_fraction must be a number in (0, 1), got {prune_fraction!r}")
        if scope not in SCOPES:
            raise ValueError(f"{fn}: scope must be one of {SCOPES}, got {scope!r}")
        if control in _OLD_CONTROLS:
            warnings.warn(
                f"{fn}: control={control!r} is the pipeline control {_OLD_CONTROLS[control]!r} (every prune re-run "
                "with re-drawn weights or random masks, so its masks are not the ticket's); for the paper's control "
                f"of a level's ticket use imp.control(level, {control!r}); pass control={_OLD_CONTROLS[control]!r} "
                "to keep this behaviour",
                FutureWarning,
                stacklevel=2,
            )
            control = _OLD_CONTROLS[control]
        if control not in CONTROLS:
            raise ValueError(f"{fn}: control must be one of {CONTROLS}, got {control!r}")
        if rewind not in REWINDS:
            raise ValueError(f"{fn}: rewind must be one of {REWINDS}, got {rewind!r}")
        if rewind == "lr" and control is not None:
            raise ValueError(
                f"{fn}: control={control!r} replaces the rewound weights (a control of weight rewinding); "
                "rewind='lr' keeps the trained weights, so it takes control=None"
            )
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ValueError(f"{fn}: rewind_step must be an int >= 0, got {rewind_step!r}")
        layout = check_layout(fn, layout)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{fn}: seed must be an int, got {seed!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"{fn}: adaptive must be a bool, got {adaptive!r}")
        if adaptive:
            ratios = _check_adaptive(fn, scope, control, adaptive_data, adaptive_subsample, adaptive_ratios,
                                     adaptive_batch_size)  # fmt: skip
            from ..tickets.interpolate import _betas  # not at the top: sparsekern.tickets imports training

            try:
                adaptive_betas = list(_betas(adaptive_betas))
            except (TypeError, ValueError) as err:  # its message names interpolate's argument
                raise type(err)(f"{fn}: adaptive_{str(err).removeprefix('interpolate: ')}") from err
        if isinstance(model, nn.parallel.DistributedDataParallel):
            if layout == "sparse":
                raise ValueError(
                    f"{fn}: layout='sparse' replaces the Linear layers, so a DistributedDataParallel wrapper "
                    "made before IMP would train the old ones; pass the model itself with group=, and wrap it anew "
                    "every round"
                )
            group = model.process_group if group is None else group
        self.model = _unwrap(model)
        self.sparsity, self.prune_fraction, self.scope = float(sparsity), float(prune_fraction), scope
        self.rewind_step, self.pipeline_control, self.layout, self.seed = rewind_step, control, layout, seed
        self.rewind = rewind
        self.group = group
        self.adaptive = adaptive
        if adaptive:
            self._adaptive = {"data": adaptive_data, "subsample": adaptive_subsample, "betas": adaptive_betas,
                              "ratios": ratios, "batch_size": adaptive_batch_size,
                              "loss_fn": adaptive_loss_fn or nn.functional.cross_entropy}  # fmt: skip
        self._epsilon = self._threshold = None  # the adaptive rule's, set when round 0 ends
        self.generator = torch.Generator().manual_seed(seed)
        sparsify(self.model, 0.0, distribution="uniform", layout=layout, include=include, exclude=exclude)
        self._names = list(sparse_layers(self.model))
        numel = [math.prod(as_layer(m).shape) for m in sparse_layers(self.model).values()]
        self._targets = [int(round((1 - self.sparsity) * n)) for n in numel]
        # the counts each round trains at, fixed here: one dense round, then one per prune until the target
        if scope == "layer":
            chains = [prune_counts(n, t, self.prune_fraction) for n, t in zip(numel, self._targets, strict=True)]
            ok = None not in chains
            rounds = max(map(len, chains)) if ok else 0
            self._counts = [[c[min(r, len(c) - 1)] for c in chains] for r in range(rounds)] if ok else None
        else:  # a per-layer rounded target sum is within half a weight per layer of the geometric count
            totals = prune_counts(sum(numel), sum(self._targets), self.prune_fraction, tolerance=len(numel) / 2)
            self._counts = None if totals is None else [[c] for c in totals]
        if self._counts is None:
            raise ValueError(
                f"{fn}: prune_fraction={prune_fraction!r} needs more than {MAX_PRUNE_ROUNDS} rounds to reach sparsity "
                f"{sparsity!r}; raise prune_fraction"
            )
        if adaptive:  # the counts are chosen as the rounds go: only the dense one is known
            self._counts = self._counts[:1]
        self._set_rounds()
        self.round = 0
        self.history: list[IMPRound] = []
        self._in_round = False
        self._sparsifier: _RoundSparsifier | None = None  # the current round's
        self._resume: dict | None = None  # a loaded round's sparsifier state, for the next start_round
        self._rewind = None  # the weights' rewind point (rewind="weights")
        self._lr_point = None  # the learning-rate schedule's, saved when step k + 1 of round 0 begins
        # the levels' masks, for the controls of their tickets: the last level each weight is in (levels are
        # nested, so level L's mask is level_of >= L; 2 bytes per weight however many levels), and the first
        # level known (a state saved before levels were kept knows only its own)
        self._level_of = {name: torch.zeros(layer.numel, dtype=torch.int16) for name, layer in zip(
            self._names, self._layers(), strict=True)}  # fmt: skip
        self._known_from = 1
        if rewind_step == 0 and rewind == "weights":
            self._save_rewind_point()

    # -- the rounds -------------------------------------------------------------------------------------------
    def start_round(self, optimizer: torch.optim.Optimizer, scheduler=None) -> Sparsifier:
        """Begin the current round with a new ``optimizer`` (without state: the reset) and, optionally, a new
        learning-rate ``scheduler`` built on it; returns the sparsifier to step during it. In rounds after the
        first, the learning-rate schedule is rewound to step ``rewind_step`` of round 0 (see the class). After
        :meth:`load_state_dict` in the middle of a round, continues that round (load the optimizer's and
        scheduler's states after this call)."""
        fn = "IMP.start_round"
        if self._in_round and self._resume is None:
            raise ValueError(f"{fn}: round already started; call end_round() first")
        if self.round >= self.rounds:
            raise ValueError(f"{fn}: all {self.rounds} rounds are done")
        _check_scheduler(fn, optimizer, scheduler)
        sparsifier = _RoundSparsifier(self, self.model, optimizer, scheduler)
        if self._resume is None and any(optimizer.state.values()):
            raise ValueError(
                f"{fn}: the optimizer already has state; IMP resets the optimizer every round, so create a new one "
                "(when resuming in a round, load the optimizer's state after start_round)"
            )
        replay = self._resume is None and self.round > 0 and self._check_replay(fn, optimizer, scheduler)
        if self._resume is not None:
            sparsifier.load_state_dict(self._resume)
        elif replay:
            self._replay(optimizer, scheduler)
        self._sparsifier, self._resume, self._in_round = sparsifier, None, True
        return sparsifier

    def _check_replay(self, fn: str, optimizer, scheduler) -> bool:
        """The checks of a new (not resumed) round after the first; True if its schedule is to be replayed."""
        saved = self._lr_point["scheduler"] if self._lr_point is not None else None
        if saved is not None and scheduler is None:
            raise ValueError(
                f"{fn}: round 0 was trained with a learning-rate scheduler; pass a new one, built on this "
                f"optimizer as round 0's was, so that its schedule is replayed from step {self.rewind_step}"
            )
        if saved is None and scheduler is not None:
            raise ValueError(
                f"{fn}: round 0 was trained without a learning-rate scheduler (none was saved at step "
                f"{self.rewind_step}), so there is no schedule to replay; pass none, or train round 0 with one"
            )
        if self._lr_point is None:
            return False
        if len(self._lr_point["groups"]) != len(optimizer.param_groups):
            raise ValueError(
                f"{fn}: the optimizer has {len(optimizer.param_groups)} parameter groups, round 0's had "
                f"{len(self._lr_point['groups'])}"
            )
        return scheduler is not None or self.rewind == "lr"

    def _replay(self, optimizer, scheduler) -> None:
        """Set the schedule as it stood at step k: the scheduler's counters and the rates it had set."""
        if scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self._lr_point["scheduler"]))
        for group, hyper in zip(optimizer.param_groups, self._lr_point["groups"], strict=True):
            group.update(copy.deepcopy(hyper))

    def end_round(self, **metrics) -> IMPRound:
        """Record the round (with the caller's ``metrics``), then, unless it was the last, prune and rewind.
        If the prune raises (under DDP: masks that differ across ranks), nothing has changed."""
        if not self._in_round:
            raise ValueError("IMP.end_round: no round started; call start_round(optimizer) first")
        lr_point = self._lr_point
        if lr_point is None and self.round == 0 and self._sparsifier.steps >= self.rewind_step:
            lr_point = self._lr_snapshot(self._sparsifier)  # round 0 ended right after step k
        if (self._rewind if self.rewind == "weights" else lr_point) is None:
            raise ValueError(
                f"IMP.end_round: round 0 ended before step rewind_step={self.rewind_step}, so there is no rewind "
                "point; train longer or lower rewind_step"
            )
        metrics = {k: _plain(k, v) for k, v in metrics.items()}
        epsilon = self._epsilon
        if self.adaptive and self.round == 0:
            epsilon = _epsilon(metrics.get("train_losses"))
        row = IMPRound(self.round, sparsity_report(self.model), metrics)
        if self.round + 1 < self.rounds:
            counts, saved = self._counts, self.generator.get_state()
            try:
                if self.adaptive:
                    adaptive, threshold = self._sweep(epsilon)
                    row = dataclasses.replace(row, adaptive=adaptive)
                    self._counts = [*counts, [self._step(counts[-1][0], adaptive["pruned"])]]
                self._level_of = self._prune_and_rewind()
            except BaseException:
                self._counts = counts
                self.generator.set_state(saved)
                raise
            if self.adaptive:
                self._epsilon, self._threshold = epsilon, threshold
                self._set_rounds()
        self._lr_point = lr_point
        self.history.append(row)
        self.round += 1
        self._in_round, self._sparsifier, self._resume = False, None, None
        return row

    @property
    def done(self) -> bool:
        """True when the last round has ended (with ``adaptive=True``: the round that trained at the target)."""
        return self.round >= self.rounds

    # -- the adaptive pruning ratio ---------------------------------------------------------------------------
    def _set_rounds(self) -> None:
        """Fixed ratio: the schedule's length. Adaptive: the rounds so far plus those left if every later prune
        removed ``prune_fraction`` (the floor), so it only shrinks, and is exact once the target is reached."""
        if not self.adaptive:
            self.rounds = len(self._counts)
            return
        count, left = self._counts[-1][0], 0
        while count > sum(self._targets):
            count, left = self._step(count, self.prune_fraction), left + 1
        self.rounds = len(self._counts) + left

    def _step(self, count: int, fraction: float) -> int:
        """The weights left after pruning ``fraction`` of ``count`` (global), rounded as the fixed schedule is and
        never below the target."""
        return prune_counts(count, sum(self._targets), fraction, tolerance=len(self._names) / 2)[1]

    def _pruned(self, layers, count: int) -> dict[str, torch.Tensor]:
        """The state_dict of a copy of the model magnitude-pruned (global) to ``count`` weights, trained values
        kept: the far end of the sweep's path."""
        keeps = self._select(layers, [count])
        model = copy.deepcopy(self.model)
        modules = sparse_layers(model)
        copies = [as_layer(modules[name]) for name in self._names]
        swaps = [_stage_topology(c, k, _dense_weight(c)) for c, k in zip(copies, keeps, strict=True)]
        for swap in swaps:
            swap()
        return model.state_dict()

    def _sweep(self, epsilon: float | None) -> tuple[dict, float]:
        """Sweep the ratios on the current level's solution; returns the round's adaptive report and the
        threshold (set from the dense solution's loss when round 0 ends)."""
        config, layers = self._adaptive, self._layers()
        count = self._counts[-1][0]
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))  # one subsample per round
        threshold, sweep, best, passes = self._threshold, [], 0.0, 0
        for ratio in config["ratios"]:
            pruned = self._step(count, ratio)
            losses, cost = _path_losses(self.model, self._pruned(layers, pruned), config, seed)
            passes += cost
            if threshold is None:  # round 0: the path starts at the dense solution
                threshold = losses[0] + epsilon
            sweep.append({"ratio": ratio, "max_loss": max(losses), "nnz": pruned})
            if max(losses) <= threshold:
                best = ratio
            if pruned == sum(self._targets):  # larger ratios stop at the target too: the same path
                break
        report = {
            "epsilon": epsilon,
            "threshold": threshold,
            "sweep": sweep,
            "ratio": best,
            "pruned": max(best, self.prune_fraction),
            "forward_passes": passes,
        }
        return report, threshold

    def masks(self) -> dict[str, torch.Tensor]:
        """{weight name ("fc1.weight"): bool mask of the weight's shape}, whatever the layout."""
        return {name: layer.mask() for name, layer in zip(self._names, self._layers(), strict=True)}

    def report(self) -> list[dict]:
        return [row.to_dict() for row in self.history]

    # -- the controls of a level's ticket ---------------------------------------------------------------------
    @property
    def levels(self) -> int:
        """How many levels have masks so far (level 0, the dense model, included); level L's are the masks that
        round L trains."""
        return min(self.round, self.rounds - 1) + 1  # the last round prunes nothing

    def ticket(self, level: int) -> Ticket:
        """Level ``level``'s ticket on a copy of the model: its masks and the rewind weights (what round ``level``
        trained), to train next to its controls in the same loop. Raises as :meth:`control`."""
        return self._ticket("IMP.ticket", level, "ticket", None)

    def control(self, level: int, kind: str, *, seed: int) -> Ticket:
        """A control of level ``level``'s ticket (Frankle & Carbin 2019; facebookresearch/open_lth's
        randomly_reinitialize and randomly_prune branches), on a copy of the model; the IMP and its model are not
        changed, so controls of any recorded level can be made at any time, also after the run.

        - ``kind="reinit"``: the level's masks exactly; the sparse layers' weights drawn anew (seeded by ``seed``)
          from nn.Linear / nn.ConvNd's default init, U(±1/sqrt(fan_in)); everything else at the rewind point.
        - ``kind="random_mask"``: in each layer a uniformly random mask (seeded) with the level's count of
          connections in it, and the rewind weights there; everything else at the rewind point.

        Train the returned :class:`Ticket` exactly like round ``level``: ``ticket.start(optimizer, scheduler)``
        with a new optimizer over ``ticket.model.parameters()`` (the schedule is replayed from ``rewind_step`` as
        for the round), then ``sparsifier.step()`` in place of ``optimizer.step()`` for the round's steps.

        Raises:
            ValueError: an unknown kind; a level that is not recorded yet (or, after loading a state saved before
                levels were kept, no longer); an IMP with ``rewind="lr"`` or a pipeline ``control=`` (its levels
                are not tickets).
            TypeError: a seed that is not an int.
        """
        fn = "IMP.control"
        if kind not in TICKET_CONTROLS:
            raise ValueError(f"{fn}: kind must be one of {TICKET_CONTROLS}, got {kind!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{fn}: seed must be an int, got {seed!r}")
        return self._ticket(fn, level, kind, seed)

    def _ticket(self, fn: str, level, kind: str, seed: int | None) -> Ticket:
        if self.rewind != "weights" or self.pipeline_control is not None:
            raise ValueError(
                f"{fn}: tickets are the masks of weight rewinding with control=None; this IMP has "
                f"rewind={self.rewind!r}, control={self.pipeline_control!r}"
            )
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level < self.levels:
            raise ValueError(
                f"{fn}: level must be an int in [1, {self.levels - 1}] (the levels pruned so far; level 0 is "
                f"the dense model), got {level!r}"
            )
        if level < self._known_from:
            raise ValueError(f"{fn}: level {level}'s masks were not recorded (the IMP state was saved before levels "
                             f"were kept; levels from {self._known_from} on are known)")  # fmt: skip
        masks = {name: (level_of >= level).nonzero().squeeze(1) for name, level_of in self._level_of.items()}
        model = copy.deepcopy(self.model)
        modules = sparse_layers(model)
        layers = [as_layer(modules[name]) for name in self._names]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        keeps = [masks[name].to(layer.param.device) for name, layer in zip(self._names, layers, strict=True)]
        if kind == "random_mask":
            keeps = [
                _random_keep(layer.numel, k.numel(), generator).to(k.device)
                for layer, k in zip(layers, keeps, strict=True)
            ]
        if kind == "reinit":
            dense = [_fresh_init(layer, generator) for layer in layers]
        else:
            dense = self._rewind["dense"]
        swaps = [_stage_topology(layer, keep, weight) for layer, keep, weight in zip(layers, keeps, dense, strict=True)]
        for swap in swaps:
            swap()
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        with torch.no_grad():
            for kind_, tensors in (("params", params), ("buffers", buffers)):
                for name, t in self._rewind[kind_].items():
                    tensors[name].copy_(t)
        for p in model.parameters():
            p.grad = None
        return Ticket(level, kind, seed, model, self)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "prune_fraction": self.prune_fraction,
            "scope": self.scope,
            "rewind_step": self.rewind_step,
            "rewind": self.rewind,
            "control": self.pipeline_control,
            "layout": self.layout,
            "seed": self.seed,
            **_adaptive_config(self._adaptive if self.adaptive else None),
        }

    def state_dict(self) -> dict:
        """Configuration, round, history, rewind point, the controls' RNG state, the masks (flat indices), every
        level's masks (as the last level of each weight, int16), with ``adaptive=True`` each round's count, epsilon
        and threshold, and, in a round, its sparsifier's state: with the model's and optimizer's state_dicts,
        enough to resume. Plain tensors, lists and dicts (``torch.load(weights_only=True)`` reads it)."""
        return {
            "kind": "IMP",
            "config": self._config(),
            "round": self.round,
            "in_round": self._in_round,
            "sparsifier": self._sparsifier.state_dict() if self._sparsifier is not None else self._resume,
            "history": [
                {
                    "round": row.round,
                    "layers": [dataclasses.astuple(r) for r in row.report.layers],
                    "skipped": [dataclasses.astuple(s) for s in row.report.skipped],
                    "metrics": row.metrics,
                    "adaptive": row.adaptive,
                }
                for row in self.history
            ],
            "rewind": self._rewind,
            "lr_rewind": self._lr_point,
            "generator": self.generator.get_state(),
            "active": {name: layer.active().cpu() for name, layer in zip(self._names, self._layers(), strict=True)},
            "levels": {
                "known_from": self._known_from,
                "level_of": {name: t.clone() for name, t in self._level_of.items()},
            },
            "adaptive": {"counts": [c[0] for c in self._counts], "epsilon": self._epsilon, "threshold": self._threshold}
            if self.adaptive
            else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. Load the model's state_dict (which holds the masks) first. Everything
        is checked before anything changes: on an error the IMP is as it was.

        Raises:
            ValueError: not an IMP state, another configuration or set of layers, masks that differ from the
                model's (load the model's state_dict first), or an inconsistent round, history or rewind point.
        """
        fn = "IMP.load_state_dict"
        if not isinstance(state, dict) or state.get("kind") != "IMP":
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{fn}: expected the state of an IMP, got {got!r}")
        if _STATE_KEYS - state.keys():
            raise ValueError(f"{fn}: the state lacks {sorted(_STATE_KEYS - state.keys())}")
        # states saved before rewind= existed rewound the weights
        config = state["config"]
        if isinstance(config, dict):  # states saved before rewind= and adaptive= existed
            config = {"rewind": "weights", **_adaptive_config(None), **config}
        if isinstance(config, dict) and config.get("control") in _OLD_CONTROLS:  # saved before the rename
            config = {**config, "control": _OLD_CONTROLS[config["control"]]}
        if config != self._config():
            raise ValueError(f"{fn}: configuration {state['config']} differs from this IMP's {self._config()}")
        if list(state["active"]) != self._names:
            raise ValueError(f"{fn}: state has layers {list(state['active'])}, the model has {self._names}")
        for name, layer in zip(self._names, self._layers(), strict=True):
            if not torch.equal(state["active"][name].to(layer.param.device), layer.active()):
                raise ValueError(
                    f"{fn}: the mask of {name!r} differs from the model's; load the model's state_dict first"
                )
        r, in_round, resume, rewind = state["round"], state["in_round"], state["sparsifier"], state["rewind"]
        counts, rounds, adaptive = self._counts, self.rounds, state.get("adaptive")
        try:  # the adaptive counts first: they give the number of rounds the checks below use
            if self.adaptive:
                self._counts, epsilon, threshold = self._check_adaptive_state(fn, adaptive, r, state["active"])
                self._set_rounds()
            self._load_checked(fn, state, r, in_round, resume, rewind)
        except BaseException:
            self._counts, self.rounds = counts, rounds
            raise
        if self.adaptive:
            self._epsilon, self._threshold = epsilon, threshold

    def _check_adaptive_state(self, fn: str, adaptive, r: int, active: dict) -> tuple[list, float | None, float | None]:
        """The checked counts (per round), epsilon and threshold of an adaptive state at round ``r``."""
        total, target = sum(layer.numel for layer in self._layers()), sum(self._targets)
        counts = adaptive.get("counts") if isinstance(adaptive, dict) else None
        ok = isinstance(counts, list) and all(type(c) is int for c in counts) and len(counts) in (r, r + 1)
        ok = ok and len(counts) >= 1 and counts[0] == total and counts[-1] >= target
        ok = ok and all(b < a for a, b in itertools.pairwise(counts))
        ok = ok and (len(counts) == r + 1 or counts[-1] == target)  # a finished run ends at the target
        ok = ok and counts[-1] == sum(int(a.numel()) for a in active.values())
        values = (adaptive.get("epsilon"), adaptive.get("threshold")) if isinstance(adaptive, dict) else (0, 0)
        ok = ok and all((v is None) == (r == 0) and (v is None or isinstance(v, float)) for v in values)
        if not ok:
            raise ValueError(
                f"{fn}: adaptive must be {{'counts': the weights each round trained at, from {total} down (at least "
                f"{target}), one per round started, the last the model's; 'epsilon', 'threshold': floats after round "
                f"0, else None}} at round {r}, got {adaptive!r}"
            )
        return [[c] for c in counts], *values

    def _load_checked(self, fn: str, state: dict, r: int, in_round, resume, rewind) -> None:
        """The rest of :meth:`load_state_dict`, with the number of rounds of the state set."""
        if not isinstance(r, int) or not 0 <= r <= self.rounds or len(state["history"]) != r:
            raise ValueError(
                f"{fn}: round {r!r} after {len(state['history'])} history rows; expected round r in "
                f"[0, {self.rounds}] after r rows"
            )
        if in_round is True:
            if r == self.rounds or not (
                isinstance(resume, dict)
                and resume.get("kind") == "_RoundSparsifier"
                and type(resume.get("steps")) is int
            ):
                raise ValueError(f"{fn}: in a round, the round must be below {self.rounds} and the state must hold "
                                 f"its sparsifier's state, got round {r} and {type(resume).__name__}")  # fmt: skip
        elif in_round is not False or resume is not None:
            raise ValueError(f"{fn}: in_round must be a bool, and False without sparsifier state, got {in_round!r}")
        step = resume["steps"] if in_round else 0
        saved = self.rewind == "weights" and (self.rewind_step == 0 or r > 0 or step >= self.rewind_step)
        if (rewind is not None) != saved:
            raise ValueError(
                f"{fn}: expected {'a' if saved else 'no'} rewind point at round {r}, step {step} with "
                f"rewind={self.rewind!r}, rewind_step={self.rewind_step}"
            )
        if rewind is not None:
            self._check_rewind(fn, rewind)
        lr_point = state.get("lr_rewind")  # absent from states saved before it existed (rewind="weights")
        # saved when step k + 1 of round 0 begins, or when round 0 ends after step k
        lr_saved = r > 0 or step > self.rewind_step
        lr_unsaved = r == 0 and step < self.rewind_step
        if lr_point is not None and not (
            isinstance(lr_point, dict)
            and lr_point.keys() == {"scheduler", "groups"}
            and (lr_point["scheduler"] is None or isinstance(lr_point["scheduler"], dict))
            and isinstance(lr_point["groups"], list)
            and all(isinstance(g, dict) and set(g) <= set(_SCHEDULED) for g in lr_point["groups"])
        ):
            raise ValueError(
                f"{fn}: lr_rewind must be None or {{'scheduler': a scheduler's state_dict or None, 'groups': a list "
                f"of dicts of {_SCHEDULED}}}, got {lr_point!r}"
            )
        if (lr_point is not None and lr_unsaved) or (lr_point is None and lr_saved and self.rewind == "lr"):
            raise ValueError(
                f"{fn}: expected {'no' if lr_unsaved else 'a'} learning-rate rewind point at round {r}, step "
                f"{step} with rewind_step={self.rewind_step}"
            )
        generator = state["generator"]
        check_generator_state(fn, generator, self.generator)
        known_from, level_of = self._check_levels(fn, state.get("levels"), r, state["active"])
        history = [
            IMPRound(
                row["round"],
                SparsityReport.from_rows(row["layers"], row.get("skipped", ())),
                dict(row["metrics"]),
                row.get("adaptive"),
            )
            for row in state["history"]
        ]
        # everything is checked: now change the IMP
        self.generator.set_state(generator)
        if rewind is not None:
            layers = self._layers()
            rewind = {
                **{kind: {n: t.clone() for n, t in rewind[kind].items()} for kind in ("params", "buffers")},
                "dense": [
                    t.to(layer.param.device, copy=True) for t, layer in zip(rewind["dense"], layers, strict=True)
                ],
            }
        self._rewind, self.history, self.round, self._in_round = rewind, history, r, in_round
        self._known_from, self._level_of = known_from, level_of
        self._lr_point = copy.deepcopy(lr_point)
        self._sparsifier, self._resume = None, resume

    def _check_levels(self, fn: str, levels, r: int, active: dict) -> tuple[int, dict[str, torch.Tensor]]:
        """The checked (known_from, level_of) of a state at round ``r`` (copies); a state saved before levels were
        kept knows only its own level (from its masks)."""
        last = min(r, self.rounds - 1)
        numel = {name: layer.numel for name, layer in zip(self._names, self._layers(), strict=True)}
        if levels is None:
            zeros = {n: torch.zeros(numel[n], dtype=torch.int16) for n in self._names}
            return max(last, 1), {n: z.index_fill(0, active[n].cpu(), last) for n, z in zeros.items()}
        ok = isinstance(levels, dict) and levels.keys() == {"known_from", "level_of"}
        ok = ok and type(levels["known_from"]) is int and 1 <= levels["known_from"] <= max(last, 1)
        ok = ok and isinstance(levels["level_of"], dict) and list(levels["level_of"]) == self._names
        ok = ok and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.int16 and t.shape == (numel[n],)
            and (t.numel() == 0 or (0 <= int(t.min()) and int(t.max()) <= last))
            for n, t in levels["level_of"].items()
        )  # fmt: skip
        if not ok:
            raise ValueError(
                f"{fn}: levels must be {{'known_from': an int in [1, {max(last, 1)}], 'level_of': {{layer name: int16 "
                f"tensor of the weight's numel, values in [0, {last}]}}}} at round {r}, for layers {self._names}"
            )
        level_of = levels["level_of"]
        if last > 0 and not all(
            torch.equal((level_of[n] >= last).nonzero().squeeze(1), active[n].cpu()) for n in self._names
        ):
            raise ValueError(f"{fn}: the last level's masks differ from the state's masks")
        return levels["known_from"], {n: t.clone() for n, t in level_of.items()}

    def _check_rewind(self, fn: str, rewind) -> None:
        expected = {kind: {n: t.shape for n, t in ts.items()} for kind, ts in self._rewound().items()}
        expected["dense"] = [torch.Size(layer.shape) for layer in self._layers()]
        got = None
        if isinstance(rewind, dict) and rewind.keys() == expected.keys():
            got = {kind: {n: t.shape for n, t in rewind[kind].items()} for kind in ("params", "buffers")}
            got["dense"] = [t.shape for t in rewind["dense"]]
        if got != expected:
            raise ValueError(f"{fn}: the rewind point's tensors have shapes {got}, the model's are {expected}")

    # -- internals --------------------------------------------------------------------------------------------
    def _layers(self):
        modules = sparse_layers(self.model)
        return [as_layer(modules[name]) for name in self._names]

    def _rewound(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a rewind restores besides the sparse weights: the other parameters and the buffers (not masks)."""
        sparse = {id(layer.param) for layer in self._layers()}
        return {
            "params": {n: p for n, p in self.model.named_parameters() if id(p) not in sparse},
            "buffers": {n: b for n, b in self.model.named_buffers() if n.rpartition(".")[2] not in _TOPOLOGY},
        }

    def _lr_snapshot(self, sparsifier: _RoundSparsifier) -> dict:
        """The learning-rate schedule now: the scheduler's state and the rates (and momenta) it has set."""
        scheduler = sparsifier.scheduler
        return {
            "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
            "groups": [
                {k: copy.deepcopy(g[k]) for k in _SCHEDULED if k in g} for g in sparsifier.optimizer.param_groups
            ],
        }

    def _save_lr_point(self, sparsifier: _RoundSparsifier) -> None:
        self._lr_point = self._lr_snapshot(sparsifier)

    def _save_rewind_point(self) -> None:
        point = {kind: {n: t.detach().clone() for n, t in ts.items()} for kind, ts in self._rewound().items()}
        self._rewind = {**point, "dense": [_dense_weight(layer).clone() for layer in self._layers()]}

    def _prune_and_rewind(self) -> dict[str, torch.Tensor]:
        """Prune and rewind; returns the new level_of (see __init__)."""
        # All or nothing: choose the masks (and compare them across ranks), stage every layer (where memory can
        # run out), and only then swap the layers in and rewind the rest in place (nothing left that can fail).
        layers = self._layers()
        saved = self.generator.get_state()
        try:
            keeps = self._select(layers)
            if self.pipeline_control == "random_pipeline":
                keeps = [
                    _random_keep(layer.numel, k.numel(), self.generator).to(k.device)
                    for layer, k in zip(layers, keeps, strict=True)
                ]
            if self.pipeline_control == "reinit_pipeline":
                dense = [_fresh_init(layer, self.generator) for layer in layers]
            elif self.rewind == "lr":
                dense = [_dense_weight(layer) for layer in layers]  # the trained weights stay
            else:
                dense = self._rewind["dense"]
            verify_masks_across_ranks("IMP.end_round", self.group, dict(zip(self._names, keeps, strict=True)))
            swaps = [
                _stage_topology(layer, keep, weight) for layer, keep, weight in zip(layers, keeps, dense, strict=True)
            ]
            level_of = {  # the new level's weights
                name: self._level_of[name].index_fill(0, keep.cpu(), self.round + 1)
                for name, keep in zip(self._names, keeps, strict=True)
            }
        except BaseException:
            self.generator.set_state(saved)
            raise
        with torch.no_grad():
            for kind, tensors in self._rewound().items() if self.rewind == "weights" else ():
                for name, t in tensors.items():
                    t.copy_(self._rewind[kind][name])
        for swap in swaps:
            swap()
        return level_of

    def _select(self, layers, counts=None) -> list[torch.Tensor]:
        """Each layer's surviving flat indices (ascending): the largest trained |w|, as many as ``counts`` (default:
        the schedule's next) says."""
        actives = [layer.active() for layer in layers]
        magnitudes = [layer.active_values().detach().abs().double() for layer in layers]
        if self.scope == "layer":
            keep_counts = counts or self._counts[self.round + 1]
            return [
                a[torch.sort(m, descending=True, stable=True).indices[:k]].sort().values
                for a, m, k in zip(actives, magnitudes, keep_counts, strict=True)
            ]
        (count,) = counts or self._counts[self.round + 1]
        # one ranking over all layers; ties keep the earlier layer and lower flat index
        order = torch.sort(torch.cat(magnitudes), descending=True, stable=True).indices[:count]
        owner = torch.cat([torch.full((a.numel(),), i) for i, a in enumerate(actives)])
        offset = torch.cumsum(torch.tensor([0] + [a.numel() for a in actives[:-1]]), 0)
        return [a[order[owner[order] == i] - offset[i]].sort().values for i, a in enumerate(actives)]


@dataclass(eq=False)
class Ticket:
    """A level's ticket (``kind="ticket"``) or a control of it (``"reinit"``, ``"random_mask"``) from
    :meth:`IMP.ticket` / :meth:`IMP.control`, on its own copy ``model`` of the IMP's model. Train it like round
    ``level``: ``sparsifier = ticket.start(optimizer, scheduler)`` with a new optimizer over
    ``ticket.model.parameters()``, then ``sparsifier.step()`` instead of ``optimizer.step()``.

    Example (runnable)::

        >>> import torch, sparsekern
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> imp = sparsekern.IMP(model, 0.8, prune_fraction=0.4)
        >>> def train(model, sparsifier, optimizer):
        ...     for _ in range(10):
        ...         x = torch.randn(64, 8)
        ...         nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        ...         _ = sparsifier.step()
        ...         optimizer.zero_grad()
        >>> while imp.round < imp.rounds:
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     train(model, imp.start_round(optimizer), optimizer)
        ...     _ = imp.end_round()
        >>> control = imp.control(3, "random_mask", seed=1)          # level 3's counts, random places
        >>> optimizer = torch.optim.SGD(control.model.parameters(), lr=0.1)
        >>> train(control.model, control.start(optimizer), optimizer)
        >>> [int(m.sum()) for m in control.masks().values()] == [int(m.sum()) for m in imp.ticket(3).masks().values()]
        True
    """

    level: int
    kind: str
    seed: int | None
    model: nn.Module
    _imp: IMP = field(repr=False)
    _started: bool = field(default=False, repr=False)

    def masks(self) -> dict[str, torch.Tensor]:
        """{weight name: bool mask of the weight's shape}."""
        modules = sparse_layers(self.model)
        return {name: as_layer(modules[name]).mask() for name in self._imp._names}

    def start(self, optimizer: torch.optim.Optimizer, scheduler=None) -> Sparsifier:
        """Begin training with a new ``optimizer`` (without state) over ``self.model``'s parameters and, when the
        IMP's round 0 had one, a new scheduler built on it, replayed from ``rewind_step`` as the IMP's rounds are.
        Returns the (static-mask) sparsifier to step. Once per ticket: make a new one for another run.

        Raises:
            ValueError: a second start; an optimizer with state; a scheduler where round 0 had none or none
                where it had one; another number of parameter groups than round 0's.
            TypeError: a scheduler that is not a torch LR scheduler of ``optimizer``.
        """
        fn = "Ticket.start"
        if self._started:
            raise ValueError(f"{fn}: this ticket was started already; make a new one (imp.control/imp.ticket)")
        _check_scheduler(fn, optimizer, scheduler)
        if any(optimizer.state.values()):
            raise ValueError(f"{fn}: the optimizer already has state; train the ticket with a new one, as IMP's rounds")
        sparsifier = Static(self.model, optimizer)
        if self._imp._check_replay(fn, optimizer, scheduler):
            self._imp._replay(optimizer, scheduler)
        self._started = True
        return sparsifier


def _adaptive_config(config: dict | None) -> dict:
    """The adaptive options in the IMP's configuration (its data and loss function are not saved)."""
    keys = ("subsample", "betas", "ratios", "batch_size")
    return {"adaptive": config is not None, **{f"adaptive_{k}": config and copy.copy(config[k]) for k in keys}}


def _check_adaptive(fn, scope, control, data, subsample, ratios, batch_size) -> tuple[float, ...]:
    """The checks of the adaptive options; returns the ratios as a tuple."""
    if scope != "global" or control is not None:
        raise ValueError(f"{fn}: adaptive=True prunes globally with control=None, got scope={scope!r}, "
                         f"control={control!r}")  # fmt: skip
    if data is None:
        raise ValueError(f"{fn}: adaptive=True needs adaptive_data, the training data ((x, y) or batches) to sweep on")
    pair = isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
    if not pair and (not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, Iterator))):
        raise TypeError(f"{fn}: adaptive_data must be an (x, y) tuple of tensors or a list/DataLoader of (x, y) "
                        f"batches (read once per point), got {type(data).__name__}")  # fmt: skip
    if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or not pair
                                  or not 0 < subsample <= data[0].shape[0]):  # fmt: skip
        raise ValueError(f"{fn}: adaptive_subsample must be None or an int in [1, samples] with (x, y) tensors as "
                         f"adaptive_data, got {subsample!r}")  # fmt: skip
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: adaptive_batch_size must be an int >= 1, got {batch_size!r}")
    ratios = tuple(ratios) if isinstance(ratios, Iterable) else ()
    if (
        not ratios
        or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in ratios)
        or any(b <= a for a, b in itertools.pairwise(ratios))
    ):
        raise ValueError(f"{fn}: adaptive_ratios must be increasing numbers in (0, 1), got {ratios!r}")
    return tuple(float(r) for r in ratios)


def _epsilon(losses) -> float:
    """The adaptive rule's epsilon: the standard deviation (n - 1) of the last dense epoch's batch losses."""
    values = losses.tolist() if isinstance(losses, torch.Tensor) else losses
    if (
        not isinstance(values, (list, tuple))
        or len(values) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise ValueError(
            "IMP.end_round: adaptive=True needs the training losses of the batches of the last epoch of dense "
            f"training when round 0 ends: end_round(train_losses=[...]) with at least 2 finite numbers, got {losses!r}"
        )
    return float(torch.tensor(values, dtype=torch.float64).std())


def _path_losses(model: nn.Module, pruned: dict, config: dict, seed: int) -> tuple[tuple[float, ...], int]:
    """The training loss along the path from ``model`` to ``pruned`` (a state_dict) and its cost in forward
    passes (counted as the loss function's calls: one per batch and point)."""
    from ..tickets.interpolate import interpolate  # not at the top: sparsekern.tickets imports training

    passes = 0

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal passes
        passes += 1
        return config["loss_fn"](out, y)

    curve = interpolate(model, pruned, data=config["data"], betas=config["betas"], loss_fn=loss_fn,
                        subsample=config["subsample"], seed=seed, batch_size=config["batch_size"])  # fmt: skip
    return curve.losses, passes


def _check_scheduler(fn: str, optimizer, scheduler) -> None:
    if scheduler is not None and not (
        callable(getattr(scheduler, "state_dict", None))
        and callable(getattr(scheduler, "load_state_dict", None))
        and getattr(scheduler, "optimizer", None) is optimizer
    ):
        raise TypeError(
            f"{fn}: scheduler must be a torch.optim.lr_scheduler scheduler built on this round's optimizer, got "
            f"{type(scheduler).__name__}"
        )


def _random_keep(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` flat indices in [0, numel), uniformly at random, ascending."""
    return torch.randperm(numel, generator=generator)[:count].sort().values


def _dense_weight(layer) -> torch.Tensor:
    if isinstance(layer, CompressedLayer):
        return layer.module.dense_weight().detach()
    return layer.module.weight.detach()


def _fresh_init(layer, generator: torch.Generator) -> torch.Tensor:
    """A new draw of nn.Linear / nn.ConvNd's default init: U(±1/sqrt(fan_in))."""
    shape = layer.shape
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    weight = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    return weight.to(dtype=layer.param.dtype, device=layer.param.device)


def _stage_topology(layer, keep: torch.Tensor, dense: torch.Tensor) -> Callable[[], None]:
    """Build what makes ``keep`` (ascending flat indices) the layer's connections, with values from ``dense``,
    changing nothing; returns the swap that installs it (assignments and in-place copies: nothing that can fail)."""
    flat = dense.reshape(-1)
    if isinstance(layer, CompressedLayer):
        module: SparseLinear = layer.module
        old = layer.active()
        # the same unchecked path as RigL's commit: keep is ascending and unique by construction
        new_flat, update = TopologyUpdate.merge(old, sorted_contains(keep, old), keep[~sorted_contains(old, keep)])
        topology = module._stage_topology(new_flat, update)
        # A new Parameter: autograd keeps a per-tensor gradient accumulator that checks the old size (a DDP
        # reducer holds it alive), so resizing the old one would break the next backward under a new wrapper.
        values = nn.Parameter(flat[keep].clone(), requires_grad=module.values.requires_grad)

        def swap() -> None:
            module._swap_topology(topology)
            module.values = values

        return swap
    mask = flat_mask(keep, layer.shape, keep.device)
    weight = dense * mask

    @torch.no_grad()
    def swap() -> None:
        layer.module.weight_mask.copy_(mask)
        layer.module.weight.copy_(weight)
        layer.module.weight.grad = None

    return swap


def _plain(name: str, value):
    """A metric as plain Python or torch data, so the IMP's state_dict loads with ``torch.load(weights_only=True)``:
    numpy scalars become Python numbers, arrays tensors, subclasses (IntEnum, named tuples) their builtin base."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if type(value).__module__ == "numpy":  # without importing numpy: a scalar or an array
        return _plain(name, value.item()) if value.ndim == 0 else torch.from_numpy(value.copy())
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {_plain(name, k): _plain(name, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(name, v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"IMP.end_round: metric {name!r} must be a number, string, bool, None, tensor, numpy value, or a list, tuple "
        f"or dict of them (so the state_dict loads with weights_only=True), got {type(value).__name__}"
    )
