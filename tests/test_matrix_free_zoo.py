"""``GGNOperator``, ``HessianOperator`` and ``EFOperator`` products on every model and loss of
the zoo.

The products take different routes by shape: one column through a
dual-number forward pass (GGN) or a plain backward of the gradient
(Hessian), several columns through ``vmap``/batched backward, convolutional
models one column at a time, the loss Hessian in output space through the
loss rule's square root. Every route is checked here against dense float64
references that never touch curvext: the GGN ``Jᵀ H J`` of
``tests/references.py`` (reverse-mode Jacobians), the empirical Fisher from
reverse-mode per-sample gradients, and the Hessian as central
finite differences of the loss's autograd gradient (not ``torch.func.hessian``
of the loss as a function of one flat parameter vector: in torch 2.14 that comes
out asymmetric on the LayerNorm models here, 0.07-0.2 away from the finite
differences).
``Embedding(padding_idx=...)``: PyTorch's backward holds the padding row
constant, so its rows and columns of the references are zero. The zoo covers
residual, sequence, tied-weight, attention, transposed-convolution,
embedding, frozen and custom-parameter models and every loss option. The
data are split into two batches, so the products also sum over batches.
"""

import copy
import re

import pytest
import torch
from torch.func import functional_call, jacrev

from curvext.operators import EFOperator, GGNOperator, HessianOperator, JacobianOperator
from tests.cases import CASES, LOSS_CASES, dense_reference

ZOO = CASES + LOSS_CASES


def _padding_entries(model, named) -> torch.Tensor:
    """Flat indices of the ``padding_idx`` rows of the model's embeddings."""
    offsets, start = {}, 0
    for _, param in named:
        offsets[id(param)] = start
        start += param.numel()
    entries = []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            first = offsets[id(module.weight)] + module.padding_idx * module.embedding_dim
            entries.extend(range(first, first + module.embedding_dim))
    return torch.tensor(entries, dtype=torch.long)


def _loss_hessian(model, loss_fn, X, y, named, step=1e-5):
    """``[P, P]``: central differences of the autograd gradient of the loss."""
    params = [p for _, p in named]
    flat = torch.cat([p.detach().flatten() for p in params])

    def gradient(theta):
        values = {}
        for (name, param), block in zip(named, theta.split([p.numel() for p in params])):
            values[name] = block.view_as(param).requires_grad_()
        loss = loss_fn(functional_call(model, values, (X,)), y)
        grads = torch.autograd.grad(loss, list(values.values()), allow_unused=True)
        return torch.cat(
            [
                torch.zeros(v.numel()) if g is None else g.flatten()
                for g, v in zip(grads, values.values())
            ]
        )

    basis = torch.eye(len(flat))
    columns = [(gradient(flat + step * e) - gradient(flat - step * e)) / (2 * step) for e in basis]
    return torch.stack(columns, 1)


def _empirical_fisher(model, loss_fn, X, y, named):
    """``[P, P]``: ``c Σ_n g_n g_nᵀ`` from reverse-mode per-sample gradients of
    the sample's summed loss terms, ``c`` the mean's normalisation (1 for sums)."""
    params = [p.detach() for _, p in named]
    flat = torch.cat([p.flatten() for p in params])
    unreduced, summed = copy.copy(loss_fn), copy.copy(loss_fn)
    unreduced.reduction, summed.reduction = "none", "sum"

    def output_of(theta):
        blocks = theta.split([p.numel() for p in params])
        values = {n: b.view_as(p) for (n, _), b, p in zip(named, blocks, params)}
        return functional_call(model, values, (X,))

    def sample_losses(theta):
        losses = unreduced(output_of(theta), y)
        return losses.reshape(losses.shape[0], -1).sum(1)

    gradients = jacrev(sample_losses)(flat)  # [N, P]
    output = output_of(flat).detach()
    normalization = 1.0
    if loss_fn.reduction == "mean":
        normalization = float(loss_fn(output, y) / summed(output, y))
    return normalization * gradients.T @ gradients


def _two_batches(X, y):
    half = max(1, X.shape[0] // 2)
    return [(X[:half], y[:half]), (X[half:], y[half:])]


@pytest.mark.parametrize("case", ZOO, ids=repr)
@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef"])
def test_products_on_the_zoo(case, kind):
    model, loss_fn, X, y = case.build()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    operator_class = {"ggn": GGNOperator, "hessian": HessianOperator, "ef": EFOperator}[kind]
    try:
        operator = operator_class(model, loss_fn, params, _two_batches(X, y))
    except ValueError as error:  # a loss option curvext refuses, by name
        assert case.option is not None and re.search(case.option, str(error)), error
        return
    if kind == "ggn":
        dense = dense_reference(case.name).ggn(names)
        tolerance = {}
    elif kind == "ef":
        dense = _empirical_fisher(model, loss_fn, X, y, named)
        tolerance = {}
    else:
        dense = _loss_hessian(model, loss_fn, X, y, named)
        tolerance = {"rtol": 1e-6, "atol": 1e-8}  # the differences' truncation error
    constant = _padding_entries(model, named)
    dense[constant, :] = 0
    dense[:, constant] = 0
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(operator.shape[0], 3, generator=generator)
    torch.testing.assert_close(operator @ V[:, 0], dense @ V[:, 0], **tolerance)
    torch.testing.assert_close(operator @ V, dense @ V, **tolerance)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jacobian_on_the_zoo(case):
    """``J @ V`` (``jvp``) and ``J.T @ W`` (``vjp``) against the reverse-mode
    Jacobian of the model output (rows ``n·C + c``), over two batches."""
    model, _, X, y = case.build()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    jacobian = JacobianOperator(model, [p for _, p in named], _two_batches(X, y))
    dense = dense_reference(case.name).jacobian(names).clone()
    dense[:, _padding_entries(model, named)] = 0
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(jacobian.shape[1], 3, generator=generator)
    W = torch.randn(jacobian.shape[0], 2, generator=generator)
    torch.testing.assert_close(jacobian @ V[:, 0], dense @ V[:, 0])
    torch.testing.assert_close(jacobian @ V, dense @ V)
    torch.testing.assert_close(jacobian.T @ W, dense.T @ W)
