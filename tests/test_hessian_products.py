"""``HMP`` and ``PCHMP``: products with a parameter's Hessian block and its
positive-curvature block, against dense float64 constructions.

The Hessian block comes from ``torch.autograd.functional.hessian``. The
positive-curvature Hessian (Chen et al., 2018) is built densely from its
definition, :math:`J^\\top \\nabla^2\\ell\\, J + \\sum_a J_a^\\top
\\operatorname{diag}(m(g_a \\phi_a''(x_a))) J_a` with ``m`` = clip at 0 or
absolute value, from dense Jacobians of the model output and of every
activation input w.r.t. the parameter.
"""

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import HMP, PCHMP


class Residual(nn.Module):
    """``x ↦ out(tanh(b(z)) + z)``, ``z = sigmoid(a(x))``: activations on a
    residual graph, one of them functional."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x, taps=None):
        z = self.a(x)
        h = torch.sigmoid(z)
        u = self.b(h)
        if taps is not None:  # the activations' inputs, for the dense reference
            taps.extend([z, u])
        return self.out(torch.tanh(u) + h)


#: The activations of ``Residual`` in order, with their second derivatives.
SECOND = [
    lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)) * (1 - 2 * torch.sigmoid(z)),
    lambda u: -2 * torch.tanh(u) * (1 - torch.tanh(u) ** 2),
]


def _setup():
    torch.manual_seed(3)
    model = Residual()
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    return model, nn.CrossEntropyLoss(), X, y


def _functional(model, name, X, taps=None):
    """The model as a function of one flattened parameter."""
    param = dict(model.named_parameters())[name]

    def call(flat):
        params = {**dict(model.named_parameters()), name: flat.view(param.shape)}
        return torch.func.functional_call(model, params, (X,), {"taps": taps})

    return call, param.detach().flatten()


def _dense_blocks(model, loss_fn, X, y, name, modify=None):
    """The Hessian block (``modify=None``) or the positive-curvature block."""
    call, flat = _functional(model, name, X)
    if modify is None:
        return torch.autograd.functional.hessian(lambda t: loss_fn(call(t), y), flat)
    logits = call(flat).detach()
    out_jac = torch.autograd.functional.jacobian(call, flat)  # [N, C, P]
    loss_hessian = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), logits)
    block = torch.einsum("nai,namb,mbj->ij", out_jac, loss_hessian, out_jac)
    for index, second in enumerate(SECOND):
        # Jacobian of the activation's input, and the loss gradient at its output
        def tap(t, index=index):
            found = []
            _functional(model, name, X, found)[0](t)
            return found[index]

        inputs = tap(flat).detach()
        jac = torch.autograd.functional.jacobian(tap, flat)  # [N, F, P]
        activation = torch.sigmoid if index == 0 else torch.tanh
        grad = _output_gradient(model, loss_fn, X, y, index, activation(inputs))
        curvature = grad * second(inputs)
        curvature = curvature.clamp(min=0) if modify == "clip" else curvature.abs()
        block = block + torch.einsum("nfi,nf,nfj->ij", jac, curvature, jac)
    return block


def _output_gradient(model, loss_fn, X, y, index, value):
    """The loss gradient w.r.t. activation ``index``'s output ``value``."""
    value = value.clone().requires_grad_()
    z = model.a(X)
    h = value if index == 0 else torch.sigmoid(z)
    t = value if index == 1 else torch.tanh(model.b(h))
    out = model.out(t + h)
    return torch.autograd.grad(loss_fn(out, y), value)[0]


@pytest.mark.parametrize("modify", [None, "clip", "abs"])
def test_block_products_match_dense_blocks(modify):
    model, loss_fn, X, y = _setup()
    references = {
        name: _dense_blocks(model, loss_fn, X, y, name, modify)
        for name, _ in model.named_parameters()
    }
    extension = HMP() if modify is None else PCHMP(modify=modify)
    extended, extended_loss = extend(model), extend(nn.CrossEntropyLoss())
    with backpack(extension):
        extended_loss(extended(X), y).backward()
    generator = torch.Generator().manual_seed(0)
    for name, param in extended.named_parameters():
        product = getattr(param, extension.savefield)
        matrix = torch.randn(4, *param.shape, generator=generator)
        expected = (matrix.flatten(1) @ references[name]).view_as(matrix)
        torch.testing.assert_close(product(matrix), expected, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(product(matrix[0]), expected[0], rtol=1e-10, atol=1e-13)


def test_positive_curvature_blocks_are_positive_semidefinite():
    model, loss_fn, X, y = _setup()
    extended, extended_loss = extend(model), extend(loss_fn)
    with backpack(PCHMP(), HMP()):
        extended_loss(extended(X), y).backward()
    weight = extended.a.weight
    basis = torch.eye(weight.numel()).view(-1, *weight.shape)
    pch = weight.pchmp(basis).flatten(1)
    hessian = weight.hmp(basis).flatten(1)
    assert torch.linalg.eigvalsh((pch + pch.T) / 2).min() > -1e-12
    assert torch.linalg.eigvalsh((hessian + hessian.T) / 2).min() < -1e-6  # the Hessian is not


def test_pchmp_refuses_an_unknown_modification():
    with pytest.raises(ValueError, match='PCHMP.*"clip" or "abs"'):
        PCHMP(modify="square")


def test_products_check_the_shape_they_are_given():
    model, loss_fn, X, y = _setup()
    extended, extended_loss = extend(model), extend(loss_fn)
    with backpack(HMP()):
        extended_loss(extended(X), y).backward()
    expected = r"p.hmp of Linear.weight: expected a tensor \[V, \*\[5, 4\]\]"
    with pytest.raises(ValueError, match=expected):
        extended.a.weight.hmp(torch.randn(2, 4, 5))
