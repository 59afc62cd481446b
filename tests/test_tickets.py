import copy
import math

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseLinear
from sparsekern.tickets import (
    InterpolationCurve,
    error_barrier,
    instability,
    interpolate,
    recompute_batch_norm,
)
from sparsekern.training.sparsify import make_masked


def _linear(weight, bias=None):
    weight = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def _recorder(*getters):
    """An evaluate callable that records ``getter(model)`` at each β (and returns loss 0, error 0)."""
    seen = []

    def evaluate(model):
        seen.append([g(model).detach().clone() for g in getters])
        return 0.0, 0.0

    return evaluate, seen


def test_interpolate_hand_computation():
    # A = identity, B = swap, x = identity, y = (0, 1). The logits of sample i are row i of W(β).
    a, b = _linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), _linear([[0.0, 1.0], [1.0, 0.0]], [0.0, 0.0])
    data = (torch.eye(2, dtype=torch.float64), torch.tensor([0, 1]))
    curve = interpolate(a, b, data=data, betas=3)
    assert curve.betas == (0.0, 0.5, 1.0)
    # β=0: logits (1, 0) and (0, 1), both right; β=½: equal logits, loss log 2, argmax picks class 0 -> one wrong;
    # β=1: both wrong, loss log(1 + e).
    expected_losses = (math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(1.0)))
    assert curve.losses == pytest.approx(expected_losses, rel=1e-15)
    assert curve.errors == (0.0, 0.5, 1.0)
    # β=¼: W = [[¾, ¼], [¼, ¾]], logit gap ½ on the right class for both samples.
    quarter = interpolate(a, b, data=data, betas=[0.25])
    assert quarter.losses == pytest.approx((math.log1p(math.exp(-0.5)),), rel=1e-15)
    assert quarter.errors == (0.0,)


def test_interpolate_betas_int_is_linspace():
    a, b = _linear([[1.0]]), _linear([[3.0]])
    evaluate, seen = _recorder(lambda m: m.weight)
    curve = interpolate(a, b, evaluate=evaluate, betas=5)
    assert curve.betas == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert [s[0].item() for s in seen] == [1.0, 1.5, 2.0, 2.5, 3.0]


@pytest.mark.parametrize(
    "betas, errors, linear, worst",
    [
        ((0.0, 0.5, 1.0), (0.25, 0.75, 0.5), 0.375, 0.25),  # a bump: 0.75 − (0.25+0.5)/2 and 0.75 − 0.5
        ((0.0, 0.25, 1.0), (0.0, 0.5, 1.0), 0.25, 0.0),  # above the line, below the worse endpoint
        ((0.0, 0.5, 1.0), (0.5, 0.25, 0.75), 0.0, 0.0),  # a valley: the endpoints' 0 is the max
    ],
)
def test_error_barrier_definitions(betas, errors, linear, worst):
    curve = InterpolationCurve(betas, losses=errors, errors=errors)
    assert error_barrier(curve) == linear
    assert error_barrier(curve, reference="linear") == linear == curve.barrier
    assert error_barrier(curve, reference="max") == worst == curve.barrier_max


def test_error_barrier_of_loss_and_to_dict():
    curve = InterpolationCurve((0.0, 0.5, 1.0), losses=(1.0, 3.0, 2.0), errors=(0.0, 0.0, 0.0))
    assert error_barrier(curve, metric="loss") == 1.5
    assert error_barrier(curve, reference="max", metric="loss") == 1.0
    assert curve.to_dict() == {
        "betas": [0.0, 0.5, 1.0],
        "losses": [1.0, 3.0, 2.0],
        "errors": [0.0, 0.0, 0.0],
        "barrier": 0.0,
        "barrier_max": 0.0,
        "loss_barrier": 1.5,
    }


def test_union_of_supports_masked():
    gen = torch.Generator().manual_seed(1)
    a = nn.Sequential(nn.Linear(5, 3, dtype=torch.float64))
    b = copy.deepcopy(a)
    for model in (a, b):
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(3, 5, generator=gen, dtype=torch.float64))
    mask_a, mask_b = torch.rand(3, 5, generator=gen) < 0.5, torch.rand(3, 5, generator=gen) < 0.5
    make_masked(a[0], mask_a)
    make_masked(b[0], mask_b)
    w_a, w_b = a[0].weight.detach().clone(), b[0].weight.detach().clone()
    with torch.no_grad():  # a weight stepped off its mask: the network computes with weight * mask
        a[0].weight[~mask_a] = 7.0
    evaluate, seen = _recorder(lambda m: m[0].weight, lambda m: m[0].weight_mask)
    betas = (0.0, 0.3, 1.0)
    interpolate(a, b, evaluate=evaluate, betas=betas)
    for beta, (weight, mask) in zip(betas, seen, strict=True):
        assert torch.equal(mask, mask_a | mask_b)
        assert torch.equal(weight, (1 - beta) * w_a + beta * w_b)
        assert not weight[~(mask_a | mask_b)].any()


def test_union_of_supports_sparse_linear():
    gen = torch.Generator().manual_seed(2)
    dense = nn.Linear(6, 4)
    mask_a, mask_b = torch.rand(4, 6, generator=gen) < 0.4, torch.rand(4, 6, generator=gen) < 0.4
    a = nn.Sequential(SparseLinear.from_dense(dense, mask=mask_a), nn.ReLU())
    dense_b = nn.Linear(6, 4)
    b = nn.Sequential(SparseLinear.from_dense(dense_b, mask=mask_b), nn.ReLU())
    evaluate, seen = _recorder(lambda m: m[0].weight, lambda m: m[0].bias)
    seen_types = []
    interpolate(a, b.state_dict(), evaluate=lambda m: (seen_types.append(type(m[0])), evaluate(m))[1], betas=3)
    assert seen_types == [nn.Linear] * 3  # densified on the scratch copy
    d_a, d_b = dense.weight.detach() * mask_a, dense_b.weight.detach() * mask_b
    for beta, (weight, bias) in zip((0.0, 0.5, 1.0), seen, strict=True):
        expected = ((1 - beta) * d_a.double() + beta * d_b.double()).float()
        assert torch.equal(weight, expected)
        assert torch.equal(bias, ((1 - beta) * dense.bias.double() + beta * dense_b.bias.double()).float())
        assert not weight[~(mask_a | mask_b)].any()
    assert isinstance(a[0], SparseLinear) and torch.equal(a[0].mask, mask_a)  # the user's model is unchanged


def _bn_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(seed + 10)
    return model


def test_batch_norm_recomputed_at_each_beta():
    a, b = _bn_model(0), _bn_model(1)
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    stats = lambda m: m[1].running_mean, lambda m: m[1].running_var, lambda m: m[1].num_batches_tracked  # noqa: E731
    betas = (0.0, 0.4, 1.0)
    evaluate, seen = _recorder(*stats)
    interpolate(a, b, evaluate=evaluate, betas=betas, bn_data=x)
    plain, seen_plain = _recorder(*stats)
    interpolate(a, b, evaluate=plain, betas=betas)
    for beta, (mean, var, count), (mean0, var0, count0) in zip(betas, seen, seen_plain, strict=True):
        lin_w = (1 - beta) * a[0].weight + beta * b[0].weight
        lin_b = (1 - beta) * a[0].bias + beta * b[0].bias
        h = x @ lin_w.T + lin_b
        torch.testing.assert_close(mean, h.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, h.var(0), rtol=1e-12, atol=1e-12)  # running_var is unbiased
        assert count.item() == 1
        # without bn_data: the interpolated running statistics, num_batches_tracked from a
        torch.testing.assert_close(mean0, (1 - beta) * a[1].running_mean + beta * b[1].running_mean)
        assert count0.item() == 10
        torch.testing.assert_close(var0, (1 - beta) * a[1].running_var + beta * b[1].running_var)
        assert not torch.allclose(mean, mean0)


def test_batch_norm_loader_batches_count_equally():
    model = _bn_model(0)
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(5, 3, generator=gen, dtype=torch.float64), None) for _ in range(2)]
    recompute_batch_norm(model, batches)
    with torch.no_grad():
        h = [model[0](x) for x, _ in batches]
    torch.testing.assert_close(model[1].running_mean, (h[0].mean(0) + h[1].mean(0)) / 2, rtol=1e-12, atol=1e-12)
    assert not model.training and model[1].momentum == 0.1


def test_user_models_unchanged():
    a, b = _bn_model(0), _bn_model(1)
    a.train()
    before_a, before_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    x = torch.randn(8, 3, dtype=torch.float64)
    interpolate(a, b, data=(x, torch.randint(0, 2, (8,))), bn_data=x)
    for before, model in ((before_a, a), (before_b, b)):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert a.training and b.training


def test_subsample_reproducible():
    gen = torch.Generator().manual_seed(5)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    x, y = torch.randn(40, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen)
    first = interpolate(a, b, data=(x, y), subsample=7, seed=11, betas=4)
    assert first == interpolate(a, b, data=(x, y), subsample=7, seed=11, betas=4)
    assert first != interpolate(a, b, data=(x, y), subsample=7, seed=12, betas=4)
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(11))[:7]
    manual = interpolate(a, b, data=(x[pick], y[pick]), betas=4)
    assert first == manual
    # chunking into batches does not change the result beyond rounding
    chunked = interpolate(a, b, data=(x, y), betas=4, batch_size=3)
    whole = interpolate(a, b, data=(x, y), betas=4)
    assert chunked.errors == whole.errors
    assert chunked.losses == pytest.approx(whole.losses, rel=1e-13)
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    assert interpolate(a, b, data=loader, betas=4).losses == pytest.approx(whole.losses, rel=1e-13)


def test_errors():
    a, b = nn.Linear(2, 2), nn.Linear(2, 3)
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))
    with pytest.raises(
        ValueError,
        match=r"b does not fit the model's architecture: 'weight' has shape \(3, 2\), the model's is \(2, 2\)",
    ):
        interpolate(a, b, data=data)
    masked = copy.deepcopy(a)
    make_masked(masked, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="b does not fit the model's architecture: 'weight_mask' is missing"):
        interpolate(masked, nn.Linear(2, 2), data=data)
    with pytest.raises(ValueError, match="a does not fit the model's architecture: 'weight_mask' is not in the model"):
        interpolate(masked.state_dict(), a, data=data)
    with pytest.raises(ValueError, match="exactly one of data="):
        interpolate(a, a, betas=3)
    with pytest.raises(ValueError, match="exactly one of data="):
        interpolate(a, a, data=data, evaluate=lambda m: (0.0, 0.0))
    with pytest.raises(ValueError, match="pass model="):
        interpolate(a.state_dict(), a.state_dict(), data=data)
    with pytest.raises(TypeError, match="a must be an nn.Module or a state_dict, got int"):
        interpolate(3, a, data=data)
    with pytest.raises(TypeError, match="evaluate must be callable"):
        interpolate(a, a, evaluate=3)
    with pytest.raises(TypeError, match="data must be"):
        interpolate(a, a, data=3)
    with pytest.raises(ValueError, match="x and y differ in length: 4 and 3"):
        interpolate(a, a, data=(data[0], data[1][:3]))
    with pytest.raises(TypeError, match="data is a one-shot iterator, but it is read once per beta"):
        interpolate(a, a, data=iter([data]))
    with pytest.raises(TypeError, match="bn_data is a one-shot iterator"):
        interpolate(a, a, data=data, bn_data=(x for x in [data[0]]))
    with pytest.raises(TypeError, match="recompute_batch_norm: data must be a tensor, an"):
        recompute_batch_norm(_bn_model(0), 3)
    with pytest.raises(ValueError, match="data has no samples"):
        interpolate(a, a, data=[])
    with pytest.raises(ValueError, match=r"subsample must be in \[1, 4\], got 5"):
        interpolate(a, a, data=data, subsample=5)
    with pytest.raises(ValueError, match="subsample needs data as an"):
        interpolate(a, a, data=[data], subsample=2)
    with pytest.raises(ValueError, match="bn_data is given but the model has no batch-norm"):
        interpolate(a, a, data=data, bn_data=data[0])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recompute_batch_norm(a, data[0])
    with pytest.raises(ValueError, match="data has no batches"):
        recompute_batch_norm(_bn_model(0), [])
    with pytest.raises(ValueError, match="at least 2 points, got 1"):
        interpolate(a, a, data=data, betas=1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        interpolate(a, a, data=data, betas=[0.0, 1.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        interpolate(a, a, data=data, betas=[0.5, 0.5])
    with pytest.raises(TypeError, match="betas must be an int or a sequence"):
        interpolate(a, a, data=data, betas=0.5)
    curve = InterpolationCurve((0.0, 0.5), (1.0, 1.0), (0.0, 0.0))
    with pytest.raises(ValueError, match="must start at beta=0 and end at beta=1"):
        error_barrier(curve)
    with pytest.raises(ValueError, match="reference must be one of"):
        error_barrier(curve, reference="mean")
    with pytest.raises(ValueError, match="metric must be one of"):
        error_barrier(curve, metric="accuracy")


def _noisy_train(model, seed):
    """A stand-in for training: the step drawn from the global RNG (seeded by instability) and from seed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype) + seed)


def test_instability_matches_manual_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    rewind = {k: v + 1 for k, v in model.state_dict().items()}
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    result = instability(model, _noisy_train, rewind_state=rewind, seeds=(3, 5, 8), data=(x, y), betas=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    trained = {}
    for seed in (3, 5, 8):
        trained[seed] = copy.deepcopy(model)
        trained[seed].load_state_dict(rewind)
        torch.manual_seed(seed)
        _noisy_train(trained[seed], seed)
    assert set(result.curves) == {(3, 5), (3, 8), (5, 8)}
    for (s, t), curve in result.curves.items():
        assert curve == interpolate(trained[s], trained[t], data=(x, y), betas=5)
    assert result.barrier == sum(c.barrier for c in result.curves.values()) / 3
    assert result.barrier_max == sum(c.barrier_max for c in result.curves.values()) / 3
    assert result.to_dict()["pairs"][0]["seeds"] == [3, 5]
    # reproducible; train_fn may also return the trained module
    again = instability(
        model, lambda m, s: (_noisy_train(m, s), m)[1], rewind_state=rewind, seeds=(3, 5, 8), data=(x, y), betas=5
    )
    assert again == result


def test_instability_errors():
    model = nn.Linear(2, 2)
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match=r"at least two different ints, got \(1, 1\)"):
        instability(model, _noisy_train, seeds=(1, 1), data=data)
    with pytest.raises(ValueError, match=r"at least two different ints, got \(1,\)"):
        instability(model, _noisy_train, seeds=(1,), data=data)
    with pytest.raises(TypeError, match="train_fn must be callable"):
        instability(model, None, data=data)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        instability(model.state_dict(), _noisy_train, data=data)
    with pytest.raises(ValueError, match="rewind_state does not fit the model: 'bias' is missing"):
        instability(model, _noisy_train, rewind_state={"weight": torch.zeros(2, 2)}, data=data)
    with pytest.raises(TypeError, match="train_fn must return a module or None, got int"):
        instability(model, lambda m, s: 3, data=data)
    with pytest.raises(ValueError, match="exactly one of data="):
        instability(model, _noisy_train)


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_endpoints_reproduce_sparsified_models(layout):
    import sparsekern

    torch.manual_seed(0)
    x, y = torch.randn(37, 8), torch.randint(0, 4, (37,))
    a, b = (nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(2))
    sparsekern.sparsify(a, 0.8, layout=layout, generator=torch.Generator().manual_seed(1))
    sparsekern.sparsify(b, 0.8, layout=layout, generator=torch.Generator().manual_seed(2))
    curve = interpolate(a, b, data=(x, y), betas=[0.0, 1.0])
    with torch.no_grad():
        own = [nn.functional.cross_entropy(m.eval()(x), y).item() for m in (a, b)]
    # SparseLinear runs the sparse kernel, the scratch copy a dense nn.Linear: equal up to float32 rounding
    assert curve.losses == pytest.approx(own, rel=1e-5)
