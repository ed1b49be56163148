"""Errors: each names the module or argument at fault (the convention users rely on)."""

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import (
    KFAC,
    BatchGGNDiag,
    BatchGrad,
    GGNDiag,
    SqrtGGN,
)
from tests.cases import CASES_BY_NAME, run_curvext

SECOND_ORDER = {
    "GGNDiag": GGNDiag,
    "BatchGGNDiag": BatchGGNDiag,
    "SqrtGGN": SqrtGGN,
    "KFAC-type-2": lambda: KFAC("type-2"),
    "KFAC-mc": lambda: KFAC("mc"),
    "GGNDiag-mc": lambda: GGNDiag(mc_samples=2),
}


def bn_train_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    return model.train()


@pytest.mark.parametrize("make_extension", SECOND_ORDER.values(), ids=SECOND_ORDER)
def test_batchnorm_train_mode_refused(make_extension):
    model, loss_fn = bn_train_model(), nn.CrossEntropyLoss()
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match="BatchNorm"):
        run_curvext(model, loss_fn, X, y, make_extension())


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="none"),
        nn.MSELoss(reduction="none"),
        nn.BCEWithLogitsLoss(reduction="none"),
    ],
    ids=["ce", "mse", "bce"],
)
def test_reduction_none_refused(loss_fn):
    model = nn.Linear(4, 3)
    X = torch.randn(5, 4)
    y = {
        nn.CrossEntropyLoss: torch.randint(0, 3, (5,)),
        nn.MSELoss: torch.randn(5, 3),
        nn.BCEWithLogitsLoss: torch.randint(0, 2, (5, 3)).double(),
    }[type(loss_fn)]
    with pytest.raises((ValueError, NotImplementedError), match="reduction"):
        model, loss_fn = extend(model), extend(loss_fn)
        loss = loss_fn(model(X), y).sum()
        with backpack(GGNDiag()):
            loss.backward()


# first-order extensions run on any backward (BackPACK's semantics): see
# tests/test_first_order_any_backward.py
@pytest.mark.parametrize(
    "make_extension",
    [GGNDiag, SqrtGGN, lambda: KFAC("type-2")],
    ids=["GGNDiag", "SqrtGGN", "KFAC"],
)
def test_loss_not_extended(make_extension):
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    loss_fn = nn.CrossEntropyLoss()  # forgot extend(loss_fn)
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = loss_fn(model(X), y)
    # the error may come at backward or at context exit: both are inside
    with (
        pytest.raises((ValueError, RuntimeError), match="extend"),
        backpack(make_extension()),
    ):
        loss.backward()


@pytest.mark.parametrize(
    "extension_class", [GGNDiag, BatchGGNDiag, SqrtGGN, KFAC, BatchGrad], ids=str
)
def test_class_instead_of_instance(extension_class):
    with (
        pytest.raises(TypeError, match=extension_class.__name__),
        backpack(extension_class),
    ):
        pass


@pytest.mark.parametrize(
    "make_extension",
    [
        lambda: GGNDiag(mc_samples=-1),
        lambda: BatchGGNDiag(mc_samples=-2),
        lambda: SqrtGGN(mc_samples=-1),
        lambda: KFAC("mc", mc_samples=-1),
    ],
    ids=["GGNDiag", "BatchGGNDiag", "SqrtGGN", "KFAC"],
)
def test_negative_mc_samples(make_extension):
    with pytest.raises(ValueError, match="mc_samples"):
        make_extension()


@pytest.mark.parametrize("fisher_type", ["fisher", "Type-2", "", "exact"])
def test_bad_fisher_type(fisher_type):
    with pytest.raises(ValueError, match="fisher_type"):
        KFAC(fisher_type=fisher_type)


@pytest.mark.parametrize("kfac_approx", ["expanded", "mean", ""])
def test_bad_kfac_approx(kfac_approx):
    with pytest.raises(ValueError, match="kfac_approx"):
        KFAC(fisher_type="type-2", kfac_approx=kfac_approx)


class SetEntry(nn.Module):
    """Parameter-free: writes ``value`` into one entry of the loss input."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        x = x.clone()
        x[1, -1] = self.value
        return x


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "make_extension",
    [GGNDiag, lambda: GGNDiag(mc_samples=1), lambda: KFAC("type-2"), BatchGrad],
    ids=["GGNDiag", "GGNDiag-mc", "KFAC", "BatchGrad"],
)
@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse_sum", "mlp_bce"])
def test_non_finite_loss_input(case_name, make_extension, bad_value):
    model, loss_fn, X, y = CASES_BY_NAME[case_name].build()
    model = nn.Sequential(model, SetEntry(bad_value))
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)nan|inf|finite"):
        run_curvext(model, loss_fn, X, y, make_extension())
