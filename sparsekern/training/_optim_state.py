"""Per-parameter optimizer state that follows topology updates.

A topology update changes which connections exist. State tensors shaped like the parameter (SGD's momentum
buffer, Adam's moments, anything element-wise) are carried: kept connections keep their state, grown ones start
at zero. Scalars (Adam's ``step``) are left alone. Optimizers whose state has any other shape (factored
second moments, L-BFGS history) cannot follow and are refused before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# State that is not per element, so no topology update can be carried into it.
_REFUSED = ("LBFGS", "SparseAdam", "Adafactor")


def check_optimizer(fn: str, optimizer, params: Iterable[torch.nn.Parameter]) -> None:
    """Raise TypeError/ValueError unless ``optimizer`` is an optimizer that holds every one of ``params`` and whose
    state can follow topology updates."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    name = type(optimizer).__name__
    if any(base.__name__ in _REFUSED for base in type(optimizer).__mro__):
        raise TypeError(
            f"{fn}: optimizer {name} keeps state that is not element-wise per parameter, so it cannot follow "
            "mask updates; use SGD, Adam, AdamW or another optimizer with parameter-shaped state"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for p in params:
        if id(p) not in held:
            raise ValueError(
                f"{fn}: the optimizer does not hold a sparse parameter of shape {tuple(p.shape)}; create the "
                "optimizer from model.parameters() after sparsify()"
            )
    check_state(fn, optimizer, params)


def check_state(fn: str, optimizer, params: Iterable[torch.nn.Parameter]) -> None:
    """Every state tensor of ``params`` is a scalar or has the parameter's shape (else TypeError)."""
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise TypeError(
                    f"{fn}: {type(optimizer).__name__} state {key!r} has shape {tuple(value.shape)}, expected the "
                    f"parameter's shape {tuple(p.shape)} or a scalar; its state cannot follow mask updates"
                )


def stage_state(optimizer, param: torch.nn.Parameter, carry: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """{key: carry(tensor)} for every parameter-shaped state tensor of ``param`` (checked by check_state), without
    changing the optimizer: install it with :func:`swap_state` once every layer is staged."""
    state = optimizer.state.get(param) or {}
    return {key: carry(value) for key, value in state.items() if isinstance(value, torch.Tensor) and value.dim() > 0}


def swap_state(optimizer, param: torch.nn.Parameter, staged: dict) -> None:
    """Install a :func:`stage_state` result (assignments only)."""
    if staged:
        optimizer.state[param].update(staged)


def carry_state(optimizer, param: torch.nn.Parameter, carry: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every parameter-shaped state tensor of ``param`` by ``carry(tensor)`` (checked by check_state)."""
    swap_state(optimizer, param, stage_state(optimizer, param, carry))


def snapshot_step(optimizer) -> Callable[[], None]:
    """Copy what ``optimizer.step()`` (and the masking around it) may change in place: every parameter it holds, its
    gradient and its state. Returns a function that puts them back, in place; memory: one copy of each."""
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad.detach().clone() if p.grad is not None else None
            state = optimizer.state.get(p)
            if state is not None:
                state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            saved.append((p, p.detach().clone(), grad, state))

    def restore() -> None:
        with torch.no_grad():
            for p, data, grad, state in saved:
                p.copy_(data)
                if grad is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == grad.shape:
                    p.grad.copy_(grad)
                else:
                    p.grad = grad
                if state is None:
                    optimizer.state.pop(p, None)
                else:
                    optimizer.state[p] = state

    return restore
