"""``EKFACOperator.from_data`` against a dense reference of the EKFAC reduction.

The reference takes the per-sample vectors of the whole data set in one batch
(``p.sqrt_ggn`` for type-2, ``p.grad_batch`` for the empirical Fisher), forms
the GGN block ``VᵀV`` densely, builds KFAC's eigenbasis from the stored
factors ``p.kfac`` with ``torch.linalg.eigh`` and ``torch.kron``, and takes
the corrected eigenvalues as ``diag(Qᵀ VᵀV Q)``. float64 throughout.
"""

import functools

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import KFAC, BatchGrad, SqrtGGN
from curvext.operators import EKFACOperator, KronEigenOperator

SPLITS = (3, 5, 2)


def batches_of(X, y, sizes=SPLITS):
    return list(zip(X.split(list(sizes)), y.split(list(sizes))))


def mlp(reduction="mean"):
    """One position per layer: the factored path without per-sample vectors."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


def sequence(reduction="mean"):
    """A Linear shared over 4 positions, and a LayerNorm (one factor per parameter)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(10, 4, 3), torch.randn(10, 4, 2)
    return model, nn.MSELoss(reduction=reduction), X, y


def cnn(reduction="mean"):
    """Conv2d (positions), a grouped Conv2d (per-sample path), Linear."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    X, y = torch.randn(10, 2, 6, 6), torch.randint(0, 3, (10,))
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


def transposed(reduction="sum"):
    """ConvTranspose1d: factors ``[A, G]`` (the input side first)."""
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 7, 2))
    X, y = torch.randn(10, 2, 5), torch.randn(10, 2)
    return model, nn.MSELoss(reduction=reduction), X, y


PROBLEMS = {"mlp": mlp, "sequence": sequence, "cnn": cnn, "transposed": transposed}


def problem(name, reduction):
    torch.manual_seed(0)
    model, loss_fn, X, y = PROBLEMS[name](reduction)
    return extend(model), extend(loss_fn), X, y


def dense_ekfac(model, loss_fn, X, y, fisher_type, kfac_approx):
    """EKFAC assembled densely from the factors and the per-sample vectors."""
    extension = {"type-2": SqrtGGN(), "empirical": BatchGrad()}[fisher_type]
    with backpack(KFAC(fisher_type=fisher_type, kfac_approx=kfac_approx), extension):
        loss_fn(model(X), y).backward()
    # grad_batch holds c ∇ℓ_n and the empirical Fisher is c Σ ∇ℓ_n ∇ℓ_nᵀ;
    # c = 1/N for CrossEntropyLoss(reduction="mean"), the only empirical case here
    assert fisher_type == "type-2" or isinstance(loss_fn, nn.CrossEntropyLoss)
    normalization = 1.0 / X.shape[0] if loss_fn.reduction == "mean" else 1.0
    blocks = []
    for p in model.parameters():
        if fisher_type == "type-2":
            vectors = p.sqrt_ggn.flatten(0, 1).flatten(1)
            block = vectors.T @ vectors
        else:
            vectors = p.grad_batch.flatten(1)
            block = vectors.T @ vectors / normalization
        basis = functools.reduce(torch.kron, [torch.linalg.eigh(f).eigenvectors for f in p.kfac])
        corrections = (basis.T @ block @ basis).diagonal()
        blocks.append(basis @ torch.diag(corrections) @ basis.T)
        del p.kfac, p.grad
        p.__dict__.pop("sqrt_ggn", None)
        p.__dict__.pop("grad_batch", None)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_matches_dense_reference(name, reduction):
    model, loss_fn, X, y = problem(name, reduction)
    approx = "reduce" if name == "sequence" else "expand"
    E = EKFACOperator.from_data(model, loss_fn, [(X, y)], kfac_approx=approx)
    expected = dense_ekfac(model, loss_fn, X, y, "type-2", approx)
    assert isinstance(E, KronEigenOperator)
    torch.testing.assert_close(E.to_dense(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["cnn", "sequence", "transposed"])
def test_one_column_per_chunk_matches_dense_reference(name, monkeypatch):
    """Columns backpropagated one per chunk (the engine's byte budget on a large
    model): the inputs' rotation reused over chunks, the sums over chunks."""
    import curvext.engine

    monkeypatch.setattr(curvext.engine, "CHUNK_BYTES", 1)
    model, loss_fn, X, y = problem(name, "mean")
    E = EKFACOperator.from_data(model, loss_fn, batches_of(X, y))
    expected = dense_ekfac(model, loss_fn, X, y, "type-2", "expand")
    torch.testing.assert_close(E.to_dense(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_matches_dense_reference(reduction):
    model, loss_fn, X, y = problem("mlp", reduction)
    E = EKFACOperator.from_data(model, loss_fn, [(X, y)], fisher_type="empirical")
    expected = dense_ekfac(model, loss_fn, X, y, "empirical", "expand")
    torch.testing.assert_close(E.to_dense(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_batches_combine_like_one_batch(name, reduction):
    model, loss_fn, X, y = problem(name, reduction)
    split = EKFACOperator.from_data(model, loss_fn, batches_of(X, y))
    whole = EKFACOperator.from_data(model, loss_fn, [(X, y)])
    torch.testing.assert_close(split.to_dense(), whole.to_dense(), rtol=1e-9, atol=1e-11)


def test_one_factor_blocks_are_exact():
    """Bias and LayerNorm blocks: s are the eigenvalues of their own exact block."""
    model, loss_fn, X, y = problem("mlp", "mean")
    E = EKFACOperator.from_data(model, loss_fn, [(X, y)])
    with backpack(SqrtGGN()):
        loss_fn(model(X), y).backward()
    bias = model[2].bias
    vectors = bias.sqrt_ggn.flatten(0, 1)
    blocks = E.to_dense().split([p.numel() for p in model.parameters()])
    position = sum(p.numel() for p in model.parameters()) - bias.numel()
    torch.testing.assert_close(blocks[-1][:, position:], vectors.T @ vectors, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_inverse_matches_solve(damping):
    model, loss_fn, X, y = problem("cnn", "mean")
    E = EKFACOperator.from_data(model, loss_fn, batches_of(X, y))
    dense = E.to_dense()
    rhs = torch.randn(E.shape[0], 3)
    expected = torch.linalg.solve(dense + damping * torch.eye(E.shape[0]), rhs)
    torch.testing.assert_close(E.inverse(damping=damping) @ rhs, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        (E + damping).logdet(), torch.linalg.slogdet(dense + damping * torch.eye(E.shape[0]))[1]
    )
    assert isinstance(E + damping, EKFACOperator)


def test_params_subset_and_state_restored():
    model, loss_fn, X, y = problem("mlp", "sum")
    params = [model[2].weight, model[0].bias]
    E = EKFACOperator.from_data(model, loss_fn, batches_of(X, y), params=params)
    full = EKFACOperator.from_data(model, loss_fn, batches_of(X, y))
    assert all(a is b for a, b in zip(E.params, params)) and E.shape == (12 + 4,) * 2
    order = [id(p) for p in model.parameters()]
    for values, param in zip(E.eigenvalues, params):
        torch.testing.assert_close(values, full.eigenvalues[order.index(id(param))])
    assert all(p.grad is None and not hasattr(p, "kfac") for p in model.parameters())
    assert all("_ekfac_corrections" not in p.__dict__ for p in model.parameters())


def test_bad_input():
    model, loss_fn, X, y = problem("mlp", "mean")
    with pytest.raises(ValueError, match="fisher_type='forward-only'"):
        EKFACOperator.from_data(model, loss_fn, [(X, y)], fisher_type="forward-only")
    with pytest.raises(ValueError, match="iterator"):
        EKFACOperator.from_data(model, loss_fn, iter([(X, y)]))
    with pytest.raises(ValueError, match="no batch"):
        EKFACOperator.from_data(model, loss_fn, [])
    with pytest.raises(ValueError, match="damping"):
        EKFACOperator.from_data(model, loss_fn, [(X, y)]).inverse(damping=-1.0)


def test_matches_curvlinops_type2():
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = problem("mlp", "mean")
    data = batches_of(X, y)
    params = [p for p in model.parameters() if p.requires_grad]
    E = EKFACOperator.from_data(model, loss_fn, data, fisher_type="type-2")
    reference = curvlinops.EKFACLinearOperator(
        model,
        loss_fn,
        params,
        data,
        fisher_type="type-2",
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    identity = torch.eye(E.shape[0], dtype=torch.float64)
    torch.testing.assert_close(E.to_dense(), reference @ identity, rtol=1e-8, atol=1e-10)
