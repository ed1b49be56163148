"""curvext's laplace-torch backends against laplace-torch's own.

``CurvextGGN``/``CurvextEF`` must give the posterior precision and log
marginal likelihood of ``BackPackGGN``/``BackPackEF`` on models BackPACK
handles (float64, uneven batches so the ``M/N`` weighting of the Kronecker
factors is exercised), and laplace's ``torch.func`` GGN on a residual CNN
that BackPACK cannot extend.
"""

import copy
import importlib
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackEF, BackPackGGN, GGNInterface  # noqa: E402

from curvext.integrations.laplace import CurvextEF, CurvextGGN  # noqa: E402

NUM_SAMPLES, BATCH_SIZE, NUM_CLASSES = 20, 8, 3  # batches of 8, 8, 4


def _mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, NUM_CLASSES, bias=bias)
    )


def _loader(likelihood: str, num_samples: int = NUM_SAMPLES, batch_size: int = BATCH_SIZE):
    X = torch.randn(num_samples, 4)
    if likelihood == "classification":
        y = torch.randint(0, NUM_CLASSES, (num_samples,))
    else:
        y = torch.randn(num_samples, NUM_CLASSES)
    dataset = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def _fit(model, likelihood, structure, backend, loader, **kwargs):
    la = Laplace(
        copy.deepcopy(model),
        likelihood,
        subset_of_weights=kwargs.pop("subset_of_weights", "all"),
        hessian_structure=structure,
        backend=backend,
        **kwargs,
    )
    la.fit(loader)
    return la


def _precision(la) -> torch.Tensor:
    precision = la.posterior_precision
    return precision if isinstance(precision, torch.Tensor) else precision.to_matrix()


def _assert_same_posterior(ours, theirs):
    torch.testing.assert_close(_precision(ours), _precision(theirs), rtol=1e-10, atol=1e-12)
    for prior in (None, torch.tensor(0.3)):
        torch.testing.assert_close(
            ours.log_marginal_likelihood(prior_precision=prior),
            theirs.log_marginal_likelihood(prior_precision=prior),
            rtol=1e-10,
            atol=1e-10,
        )


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_ggn_matches_backpack(likelihood, structure):
    model, loader = _mlp(), _loader(likelihood)
    ours = _fit(model, likelihood, structure, CurvextGGN, loader)
    theirs = _fit(model, likelihood, structure, BackPackGGN, loader)
    _assert_same_posterior(ours, theirs)


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_ef_matches_backpack(likelihood, structure):
    model, loader = _mlp(), _loader(likelihood)
    ours = _fit(model, likelihood, structure, CurvextEF, loader)
    theirs = _fit(model, likelihood, structure, BackPackEF, loader)
    _assert_same_posterior(ours, theirs)


def test_ef_kron_is_exact_for_one_sample_through_one_layer():
    """One sample, one bias-free layer: the empirical KFAC ``g gᵀ ⊗ a aᵀ`` is the EF."""
    model, loader = nn.Linear(4, NUM_CLASSES, bias=False), _loader("classification", 1, 1)
    ours = _fit(model, "classification", "kron", CurvextEF, loader)
    dense = _fit(model, "classification", "full", BackPackEF, loader)
    _assert_same_posterior(ours, dense)


def test_last_layer_kron_matches_backpack():
    model, loader = _mlp(), _loader("classification")
    ours = _fit(model, "classification", "kron", CurvextGGN, loader, subset_of_weights="last_layer")
    theirs = _fit(
        model, "classification", "kron", BackPackGGN, loader, subset_of_weights="last_layer"
    )
    _assert_same_posterior(ours, theirs)


def test_subnetwork_matches_backpack():
    model, loader = _mlp(), _loader("classification")
    indices = torch.tensor([0, 3, 7, 30, 40, 50])
    kwargs = dict(subset_of_weights="subnetwork", subnetwork_indices=indices)
    ours = _fit(model, "classification", "full", CurvextGGN, loader, **kwargs)
    theirs = _fit(model, "classification", "full", BackPackGGN, loader, **kwargs)
    _assert_same_posterior(ours, theirs)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_stochastic_ggn_runs(structure):
    model, loader = _mlp(), _loader("classification")
    mc = {"stochastic": True, "num_samples": 2}
    la = _fit(model, "classification", structure, CurvextGGN, loader, backend_kwargs=mc)
    assert la.backend.stochastic and la.backend.num_samples == 2
    assert torch.isfinite(la.log_marginal_likelihood())
    exact = _fit(model, "classification", structure, CurvextGGN, loader)
    assert _precision(la).shape == _precision(exact).shape
    assert not torch.allclose(_precision(la), _precision(exact))


class _ResidualCNN(nn.Module):
    """Skip connection and BatchNorm (eval): BackPACK cannot extend it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Linear(3 * 4 * 4, NUM_CLASSES)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.block(h)
        return self.head(h.flatten(1))


def _cnn_loader():
    X = torch.randn(12, 1, 4, 4)
    y = torch.randint(0, NUM_CLASSES, (12,))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_residual_cnn(structure):
    model, loader = _ResidualCNN().eval(), _cnn_loader()
    la = _fit(model, "classification", structure, CurvextGGN, loader)
    assert torch.isfinite(la.log_marginal_likelihood())
    if structure != "kron":
        # laplace's own torch.func GGN as the reference
        reference = _fit(model, "classification", structure, GGNInterface, loader)
        _assert_same_posterior(la, reference)


def test_residual_cnn_glm_predictive():
    model, loader = _ResidualCNN().eval(), _cnn_loader()
    la = _fit(model, "classification", "kron", CurvextGGN, loader)
    probs = la(torch.randn(2, 1, 4, 4), pred_type="glm", link_approx="probit")
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


class _Bilinear(nn.Module):
    """A 2-d weight without a Kronecker rule (curvext's generic rule: one full block)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, NUM_CLASSES))

    def forward(self, x):
        return x @ self.weight


def test_kron_refuses_parameter_without_kronecker_factors():
    model = nn.Sequential(nn.Linear(4, 4), _Bilinear())
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvextGGN,
    )
    expected = r"shape \(4, 3\) has 1 Kronecker factor.*hessian_structure='diag'"
    with pytest.raises(ValueError, match=expected):
        la.fit(_loader("classification"))


def test_refuses_dict_inputs():
    backend = CurvextGGN(_mlp(), "classification")
    with pytest.raises(ValueError, match="dict-like inputs"):
        backend.diag({"input_ids": torch.randn(2, 4)}, torch.tensor([0, 1]))


def test_leaves_grads_alone():
    model = _mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    backend = CurvextGGN(model, "classification")
    backend.kron(torch.randn(5, 4), torch.randint(0, NUM_CLASSES, (5,)), N=5)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert not any(hasattr(p, "kfac") for p in model.parameters())


def test_missing_laplace_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "laplace" or n.startswith("laplace.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "curvext.integrations.laplace")
    with pytest.raises(ImportError, match=r"needs laplace-torch.*pip install laplace-torch"):
        importlib.import_module("curvext.integrations.laplace")
