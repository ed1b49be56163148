"""``KronOperator.from_data`` and ``DiagonalOperator.from_data`` over batches.

The reference is one backward pass over the whole data set in one batch,
read with ``from_params``; the data set is split into batches of unequal
sizes, so a plain mean over batches would be wrong. float64 throughout.
"""

import sys

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import KFAC, GGNDiag
from curvext.operators import DiagonalOperator, KronOperator

SPLITS = (3, 5, 2)


def batches_of(X, y, sizes=SPLITS):
    return list(zip(X.split(list(sizes)), y.split(list(sizes))))


def mlp_problem(reduction, weighted=False):
    """An MLP classifier; ``weighted``: class weights and an ignored target (the
    mean's denominator is then the summed weights, not the batch size)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    kwargs = {"weight": torch.tensor([0.5, 1.0, 2.0]), "ignore_index": 1} if weighted else {}
    loss_fn = nn.CrossEntropyLoss(reduction=reduction, **kwargs)
    X, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    y[0] = 0  # at least one target that is not ignored in the first batch
    return model, loss_fn, X, y


def sequence_problem(reduction):
    """A Linear on ``[N, T, D]`` (weight shared over positions), regression."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.MSELoss(reduction=reduction)
    X, y = torch.randn(10, 5, 3), torch.randn(10, 5, 2)
    return model, loss_fn, X, y


def one_batch(model, loss_fn, X, y, extension):
    model, loss_fn = extend(model), extend(loss_fn)
    with backpack(extension):
        loss_fn(model(X), y).backward()


def assert_same_operator(actual, expected):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.to_dense(), expected.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "forward-only"])
@pytest.mark.parametrize(
    "problem, kfac_approx",
    [
        (mlp_problem, "expand"),
        (sequence_problem, "expand"),
        (sequence_problem, "reduce"),
        (lambda reduction: mlp_problem(reduction, weighted=True), "expand"),
    ],
    ids=["mlp", "sequence-expand", "sequence-reduce", "mlp-weighted-ignored"],
)
def test_kron_batches_equal_one_batch(problem, kfac_approx, fisher_type, reduction):
    model, loss_fn, X, y = problem(reduction)
    K = KronOperator.from_data(
        model, loss_fn, batches_of(X, y), fisher_type=fisher_type, kfac_approx=kfac_approx
    )
    one_batch(model, loss_fn, X, y, KFAC(fisher_type=fisher_type, kfac_approx=kfac_approx))
    assert_same_operator(K, KronOperator.from_params(model.parameters()))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "problem",
    [mlp_problem, sequence_problem, lambda reduction: mlp_problem(reduction, True)],
    ids=["mlp", "sequence", "mlp-weighted-ignored"],
)
def test_diagonal_batches_equal_one_batch(problem, reduction):
    model, loss_fn, X, y = problem(reduction)
    D = DiagonalOperator.from_data(model, loss_fn, batches_of(X, y))
    one_batch(model, loss_fn, X, y, GGNDiag())
    assert_same_operator(D, DiagonalOperator.from_params(model.parameters()))


def test_params_select_and_order_the_blocks():
    model, loss_fn, X, y = mlp_problem("mean")
    params = [model[2].weight, model[0].bias]
    K = KronOperator.from_data(model, loss_fn, batches_of(X, y), params=params)
    D = DiagonalOperator.from_data(model, loss_fn, batches_of(X, y), params=params)
    one_batch(model, loss_fn, X, y, KFAC(fisher_type="type-2"))
    assert_same_operator(K, KronOperator.from_params(params))
    assert K.params == params and D.shape == (12 + 4, 12 + 4)


def test_grad_and_stored_attributes_are_left_as_they_were():
    model, loss_fn, X, y = mlp_problem("mean")
    one_batch(model, loss_fn, X, y, KFAC(fisher_type="empirical"))
    grads = [p.grad.clone() for p in model.parameters()]
    kfacs = [p.kfac for p in model.parameters()]
    model[0].bias.grad = None
    KronOperator.from_data(model, loss_fn, batches_of(X, y))
    DiagonalOperator.from_data(model, loss_fn, batches_of(X, y))
    assert model[0].bias.grad is None
    for param, grad, kfac in zip(list(model.parameters())[2:], grads[2:], kfacs[2:]):
        assert torch.equal(param.grad, grad)
    assert all(p.kfac is kfac for p, kfac in zip(model.parameters(), kfacs))
    assert all(not hasattr(p, "ggn_diag") for p in model.parameters())


def test_monte_carlo_runs_on_every_batch():
    model, loss_fn, X, y = mlp_problem("mean")
    K = KronOperator.from_data(model, loss_fn, batches_of(X, y), fisher_type="mc", mc_samples=2)
    D = DiagonalOperator.from_data(model, loss_fn, batches_of(X, y), mc_samples=3)
    assert torch.isfinite(K.to_dense()).all() and (D.diag() >= 0).all()


def test_progressbar(capsys):
    pytest.importorskip("tqdm")
    model, loss_fn, X, y = mlp_problem("sum")
    DiagonalOperator.from_data(model, loss_fn, batches_of(X, y), progressbar=True)
    assert "DiagonalOperator.from_data" in capsys.readouterr().err


def test_progressbar_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    model, loss_fn, X, y = mlp_problem("sum")
    with pytest.raises(ImportError, match="progressbar=True needs tqdm"):
        KronOperator.from_data(model, loss_fn, batches_of(X, y), progressbar=True)


@pytest.mark.parametrize("operator", [KronOperator, DiagonalOperator])
def test_empty_data(operator):
    model, loss_fn, _, _ = mlp_problem("mean")
    with pytest.raises(ValueError, match=r"from_data: `data` yielded no batch"):
        operator.from_data(model, loss_fn, [])
    with pytest.raises(ValueError, match=r"from_data: `data` yielded no batch"):
        operator.from_data(model, loss_fn, iter(()))


def test_bad_batches_and_reduction():
    model, loss_fn, X, y = mlp_problem("mean")
    with pytest.raises(ValueError, match=r"batch 0 of `data` is a Tensor, not an \(X, y\)"):
        KronOperator.from_data(model, loss_fn, [X])
    with pytest.raises(ValueError, match="needs reduction='mean' or 'sum'"):
        DiagonalOperator.from_data(model, nn.CrossEntropyLoss(reduction="none"), batches_of(X, y))
    with pytest.raises(ValueError, match="fisher_type='fisher'"):
        KronOperator.from_data(model, loss_fn, batches_of(X, y), fisher_type="fisher")


def test_kron_matches_curvlinops_type2():
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = mlp_problem("mean")
    data = batches_of(X, y)
    params = [p for p in model.parameters() if p.requires_grad]
    K = KronOperator.from_data(model, loss_fn, data, fisher_type="type-2")
    reference = curvlinops.KFACLinearOperator(
        model,
        loss_fn,
        params,
        data,
        fisher_type="type-2",
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    identity = torch.eye(K.shape[0], dtype=torch.float64)
    torch.testing.assert_close(K.to_dense(), reference @ identity, rtol=1e-9, atol=1e-12)


def test_kron_one_column_per_chunk_matches_curvlinops(monkeypatch):
    """Convolutions, type-2 columns backpropagated one per chunk (the engine's
    byte budget on a large model): the sums over chunks and batches against
    curvlinops (one backward per column); a weight and its bias share one G."""
    curvlinops = pytest.importorskip("curvlinops")
    import curvext.engine

    monkeypatch.setattr(curvext.engine, "CHUNK_BYTES", 1)
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    ).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(10, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    data = batches_of(X, y)
    params = [p for p in model.parameters() if p.requires_grad]
    K = KronOperator.from_data(model, loss_fn, data, fisher_type="type-2")
    reference = curvlinops.KFACLinearOperator(
        model,
        loss_fn,
        params,
        data,
        fisher_type="type-2",
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    identity = torch.eye(K.shape[0], dtype=torch.float64)
    torch.testing.assert_close(K.to_dense(), reference @ identity, rtol=1e-9, atol=1e-12)
    for weight_block, bias_block in zip(K.factors[0::2], K.factors[1::2]):
        assert weight_block[0] is bias_block[0]


def test_shared_sums_split_when_the_stored_tensors_stop_being_shared():
    """``_add_batch``: a tensor stored on two parameters gets one running sum;
    a later batch storing two different tensors there splits it again."""
    from curvext.operators.data import _add_batch

    shared, own = torch.tensor([1.0, 2.0]), torch.tensor([10.0])
    totals, aliases, flags = [None, None], {}, [(True, False), (True,)]
    _add_batch(totals, aliases, [[shared, own], [shared]], flags, 2.0, 3)
    assert totals[0][0] is totals[1][0] and aliases == {(1, 0): (0, 0)}
    torch.testing.assert_close(totals[0][0], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(totals[0][1], torch.tensor([30.0]))
    first, second = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    _add_batch(totals, aliases, [[first, own], [second]], flags, 1.0, 1)
    assert aliases == {}
    torch.testing.assert_close(totals[0][0], torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(totals[1][0], torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(totals[0][1], torch.tensor([40.0]))
