"""``KFRA``: Kronecker factors from batch-averaged curvature backpropagation.

The reference is the recursion of Botev et al. (2017) written out densely
for a two-layer network: the summed loss Hessian w.r.t. the logits from
``torch.autograd.functional.hessian`` per sample, the hidden layer's
:math:`\\bar G_h = \\frac1N \\sum_n D_n W_2^\\top \\bar G_L W_2 D_n` with
:math:`D_n` the activation's Jacobian from autograd, and the input factors
:math:`\\frac1N \\sum_n a_n a_n^\\top`. BackPACK's own ``KFRA`` is compared
in ``test_compat_backpack.py``.
"""

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import KFAC, KFRA


def _two_layers(activation):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), activation, nn.Linear(5, 3))


def _dense_kfra(model, loss_fn, X, y):
    first, activation, last = model
    N = X.shape[0]
    pre = first(X).detach()
    hidden = activation(pre).detach()
    logits = last(hidden).detach()
    summed = sum(
        torch.autograd.functional.hessian(lambda o, n=n: loss_fn(o, y)[n], logits)[n, :, n]
        for n in range(N)
    )
    W = last.weight.detach()
    jacobians = [
        torch.autograd.functional.jacobian(activation, pre[n]) for n in range(N)
    ]  # [5, 5] each
    hidden_curvature = sum(D.T @ W.T @ summed @ W @ D for D in jacobians) / N
    return {
        "0.weight": [hidden_curvature, X.T @ X / N],
        "0.bias": [hidden_curvature],
        "2.weight": [summed, hidden.T @ hidden / N],
        "2.bias": [summed],
    }


@pytest.mark.parametrize("activation", [nn.Sigmoid(), nn.Tanh(), nn.ReLU()])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_match_the_dense_recursion(activation, reduction):
    model = _two_layers(activation)
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    per_sample = nn.CrossEntropyLoss(reduction="none")
    scale = 1 / 6 if reduction == "mean" else 1.0
    expected = _dense_kfra(model, lambda o, t: scale * per_sample(o, t), X, y)
    extended, loss_fn = extend(model), extend(nn.CrossEntropyLoss(reduction=reduction))
    with backpack(KFRA(), KFAC(fisher_type="type-2")):
        loss_fn(extended(X), y).backward()
    for name, param in extended.named_parameters():
        assert len(param.kfra) == len(expected[name])
        for mine, reference in zip(param.kfra, expected[name]):
            torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-13)
    # the last layer's factors are KFLR's (no averaging above it)
    torch.testing.assert_close(extended[2].weight.kfra[0], extended[2].weight.kfac[0])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(x + torch.tanh(self.a(x)))


class TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + torch.tanh(h))


class TimeMajor(nn.Module):
    """``out(tanh(a(x).transpose(0, 1)).transpose(0, 1))`` with ``T == N``:
    the shapes keep ``N`` on axis 0, the samples are not there."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(3, 3), nn.Linear(3 * 4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x).transpose(0, 1)).transpose(0, 1)
        return self.out(h.reshape(h.shape[0], -1))


REFUSALS = {
    "samples-moved-off-axis-0": (TimeMajor, (4, 3), r"samples on axis 0 .* mixes"),
    "two-paths": (TwoPaths, (3,), r"single path of operations.*splits.*fisher_type='type-2'"),
    "layer-norm": (
        lambda: nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2)),
        (3,),
        r"LayerNorm.weight has no Kronecker structure",
    ),
    # a wrong layout gave wrong factors before the refusal (BackPACK's suite)
    "conv-transpose": (
        lambda: nn.Sequential(nn.ConvTranspose1d(2, 2, 2), nn.Flatten(), nn.Linear(10, 2)),
        (2, 4),
        r"KFRA of ConvTranspose1d is not in curvext",
    ),
    "grouped-conv": (
        lambda: nn.Sequential(nn.Conv1d(2, 2, 2, groups=2), nn.Flatten(), nn.Linear(6, 2)),
        (2, 4),
        r"without groups.*groups 2",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_what_to_use_instead(case):
    make, in_shape, message = REFUSALS[case]
    torch.manual_seed(0)
    model = extend(make())
    loss = extend(nn.CrossEntropyLoss())(
        model(torch.randn(4, *in_shape)), torch.tensor([0, 1, 1, 0])
    )
    with pytest.raises(NotImplementedError, match=message):
        with backpack(KFRA()):
            loss.backward()


def test_a_residual_connection_around_the_first_layer_is_a_single_path():
    """``b(x + tanh(a(x)))``: the input ``x`` needs no curvature, so the path
    from the loss to ``a`` does not split (through ``tanh``): the factors are
    the dense recursion's with ``W_2`` acting on the sum."""
    torch.manual_seed(0)
    model = Residual()
    X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    extended, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    with backpack(KFRA()):
        loss_fn(extended(X), y).backward()
    logits = model(X).detach()
    summed = sum(
        torch.autograd.functional.hessian(
            lambda o, n=n: nn.functional.cross_entropy(o, y, reduction="none")[n] / 5, logits
        )[n, :, n]
        for n in range(5)
    )
    pre = model.a(X).detach()
    W = model.b.weight.detach()
    curvature = (
        sum(
            torch.diag(1 - torch.tanh(z) ** 2)
            @ W.T
            @ summed
            @ W
            @ torch.diag(1 - torch.tanh(z) ** 2)
            for z in pre
        )
        / 5
    )
    torch.testing.assert_close(extended.a.weight.kfra[0], curvature, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(extended.a.weight.kfra[1], X.T @ X / 5)


def test_flattened_sequence_losses_are_refused():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)))
    logits = model(torch.randn(2, 3, 3))
    loss = extend(nn.CrossEntropyLoss())(logits.reshape(-1, 5), torch.randint(0, 5, (6,)))
    with pytest.raises(NotImplementedError, match="KFRA needs one row .* per sample"):
        with backpack(KFRA()):
            loss.backward()
