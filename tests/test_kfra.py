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


# ---------------------------------------------------------------------------
# curvature="hessian" / "pch-*": the second-order terms of the activations
# ---------------------------------------------------------------------------
def _three_layers():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)
    ).double()


class HalvedTanh(nn.Module):
    """``tanh(x / 2)``: a division by a constant (linear) before a curved op."""

    def forward(self, x):
        return torch.tanh(x / 2.0)


class Squeezed(nn.Module):
    def forward(self, x):
        return x.squeeze(1)


@pytest.mark.parametrize(
    "loss_fn, make_model",
    [
        (nn.MSELoss(), lambda: _three_layers()),
        (nn.CrossEntropyLoss(reduction="sum"), lambda: _three_layers()),
        (
            nn.MSELoss(),
            lambda: nn.Sequential(nn.Linear(3, 4), HalvedTanh(), nn.Linear(4, 1), Squeezed()),
        ),
    ],
    ids=["mse", "ce-sum", "division-1d-output"],
)
def test_hessian_kfra_of_one_sample_is_the_exact_hessian_block(loss_fn, make_model):
    """With one sample the batch average is exact and, for Linear layers,
    ``G ⊗ a aᵀ`` is the Hessian block: the dense Hessian of the loss in the
    parameters (``torch.autograd.functional.hessian``, float64)."""
    torch.manual_seed(2)
    model = make_model().double()
    X = torch.randn(1, 3, dtype=torch.float64)
    y = torch.randn_like(model(X)) if isinstance(loss_fn, nn.MSELoss) else torch.tensor([1])
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss_of(*values):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, values)), (X,)), y)

    blocks = torch.autograd.functional.hessian(loss_of, tuple(params))
    extended, extended_loss = extend(model), extend(loss_fn)
    with backpack(KFRA(curvature="hessian")):
        extended_loss(extended(X), y).backward()
    for index, (name, param) in enumerate(extended.named_parameters()):
        block = blocks[index][index].reshape(param.numel(), param.numel())
        dense = torch.kron(*param.kfra) if len(param.kfra) == 2 else param.kfra[0]
        torch.testing.assert_close(dense, block, msg=name)


@pytest.mark.parametrize("curvature", ["hessian", "pch-abs", "pch-clip"])
def test_hessian_kfra_matches_the_dense_recursion_with_residuals(curvature):
    """Several samples: the recursion written out for the two hidden layers,
    with :math:`\\operatorname{diag}(\\sum_n g_n \\odot \\phi''(x_n))` added at each
    activation (``g`` the loss gradient at its output, by autograd), modified
    for the positive-curvature variants."""
    model = _three_layers()
    N = 5
    X, y = torch.randn(N, 3, dtype=torch.float64), torch.randint(0, 2, (N,))
    loss_fn = nn.CrossEntropyLoss()
    modify = {"hessian": lambda d: d, "pch-abs": torch.abs, "pch-clip": lambda d: d.clamp(min=0)}
    first, sigmoid, middle, tanh, last = model
    pre1 = first(X)
    hid1 = sigmoid(pre1)
    pre2 = middle(hid1)
    hid2 = tanh(pre2)
    logits = last(hid2)
    g_hid1, g_hid2 = torch.autograd.grad(loss_fn(logits, y), [hid1, hid2])
    per_sample = nn.CrossEntropyLoss(reduction="none")
    summed = sum(
        torch.autograd.functional.hessian(lambda o, n=n: per_sample(o, y)[n] / N, logits.detach())[
            n, :, n
        ]
        for n in range(N)
    )
    s1, t2 = torch.sigmoid(pre1).detach(), torch.tanh(pre2).detach()
    d2_sigmoid = s1 * (1 - s1) * (1 - 2 * s1)
    d2_tanh = -2 * t2 * (1 - t2**2)
    W3, W2 = last.weight.detach(), middle.weight.detach()
    # through the last layer (linear), then tanh: Jacobian diag(1 - t^2) per sample
    at_hid2 = W3.T @ summed @ W3
    D2 = [torch.diag(1 - t2[n] ** 2) for n in range(N)]
    at_pre2 = sum(D @ at_hid2 @ D for D in D2) / N + torch.diag(
        modify[curvature]((g_hid2 * d2_tanh).sum(0))
    )
    at_hid1 = W2.T @ at_pre2 @ W2
    D1 = [torch.diag(s1[n] * (1 - s1[n])) for n in range(N)]
    at_pre1 = sum(D @ at_hid1 @ D for D in D1) / N + torch.diag(
        modify[curvature]((g_hid1 * d2_sigmoid).sum(0))
    )
    extended, extended_loss = extend(model), extend(loss_fn)
    with backpack(KFRA(curvature=curvature)):
        extended_loss(extended(X), y).backward()
    torch.testing.assert_close(model[0].weight.kfra[0], at_pre1.detach())
    torch.testing.assert_close(model[2].weight.kfra[0], at_pre2.detach())
    torch.testing.assert_close(model[4].bias.kfra[0], summed)


def test_hessian_kfra_refuses_operations_without_an_elementwise_term():
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)))
    loss = extend(nn.MSELoss())(model(torch.randn(4, 3)), torch.randn(4, 2))
    with pytest.raises(NotImplementedError, match="Softmax.*not elementwise.*KFRA\\(\\)"):
        with backpack(KFRA(curvature="hessian")):
            loss.backward()
    with pytest.raises(ValueError, match="KFRA\\(curvature='fisher'\\)"):
        KFRA(curvature="fisher")
