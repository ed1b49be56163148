"""Parity with BackPACK on models BackPACK supports.

BackPACK extends its own deep copy of the model; curvext never sees that
copy. Exact quantities must agree to float64 precision. Conventions:

* ``SqrtGGNExact``: column counts/orderings may differ, so ``V[:, n]^T V[:, n]``
  (per-sample GGN) and ``V^T V`` are compared.
* ``KFLR``: for Linear layers (no shared positions) ``kron`` of the factors
  must agree for both ``kfac_approx``. For Conv layers BackPACK's factors are
  ``G = Σ_n ḡ ḡ^T`` (ḡ = sum over output positions; curvlinops' *reduce* G)
  and ``A = Σ_{n,t} a a^T / N`` (T times curvlinops' *expand* A), so the
  factors are compared one by one under exactly that correspondence.
* MC extensions are compared in expectation (means over seeds, with the
  combined standard error, see ``test_mc.py`` for the statistics).
"""

import copy

import pytest
import torch
from torch import nn

from curvext.extensions import (
    KFAC,
    BatchGGNDiag,
    BatchGrad,
    BatchL2Grad,
    GGNDiag,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from tests.cases import assert_close, run_curvext, trainable
from tests.references import kron

bp = pytest.importorskip("backpack")  # the reference library (test extra)
bpext = pytest.importorskip("backpack.extensions")

# BackPACK's module hooks fire this when the input needs no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def bp_mlp(out: int = 3):
    return nn.Sequential(
        nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, out)
    )


def bp_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def ce_data(in_shape):
    return lambda N: (torch.randn(N, *in_shape), torch.randint(0, 3, (N,)))


def mse_data(in_shape):
    return lambda N: (torch.randn(N, *in_shape), torch.randn(N, 3))


def bce_data(in_shape):
    # BackPACK supports BCEWithLogitsLoss on scalar predictions [N, 1] only
    return lambda N: (torch.randn(N, *in_shape), torch.randint(0, 2, (N, 1)).double())


SETUPS = {
    "mlp-ce": (bp_mlp, nn.CrossEntropyLoss, ce_data((5,))),
    "mlp-mse-sum": (bp_mlp, lambda: nn.MSELoss(reduction="sum"), mse_data((5,))),
    "mlp-bce": (lambda: bp_mlp(1), nn.BCEWithLogitsLoss, bce_data((5,))),
    "cnn-ce": (bp_cnn, nn.CrossEntropyLoss, ce_data((2, 6, 6))),
    "cnn-mse": (bp_cnn, nn.MSELoss, mse_data((2, 6, 6))),
}


def build(setup, N=4):
    make_model, make_loss, make_data = SETUPS[setup]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, loss_fn = make_model(), make_loss()
        X, y = make_data(N)
    return model, loss_fn, X, y


def run_backpack(model, loss_fn, X, y, *extensions):
    model, loss_fn = bp.extend(copy.deepcopy(model)), bp.extend(copy.deepcopy(loss_fn))
    loss = loss_fn(model(X), y)
    with bp.backpack(*extensions):
        loss.backward()
    return model


def both(setup, bp_extension, curvext_extension, seed=None):
    model, loss_fn, X, y = build(setup)
    if seed is not None:
        torch.manual_seed(seed)
    theirs = run_backpack(model, loss_fn, X, y, bp_extension)
    if seed is not None:
        torch.manual_seed(seed)
    ours = run_curvext(copy.deepcopy(model), copy.deepcopy(loss_fn), X, y, curvext_extension)
    return ours, theirs


def paired(ours, theirs):
    """``(name, our_param, their_param)`` for trainable parameters."""
    their_params = dict(theirs.named_parameters())
    return [(name, p, their_params[name]) for name, p in trainable(ours).items()]


ELEMENTWISE = {
    "DiagGGNExact": (bpext.DiagGGNExact, "diag_ggn_exact", GGNDiag, "ggn_diag"),
    "BatchDiagGGNExact": (
        bpext.BatchDiagGGNExact,
        "diag_ggn_exact_batch",
        BatchGGNDiag,
        "batch_ggn_diag",
    ),
    "BatchGrad": (bpext.BatchGrad, "grad_batch", BatchGrad, "grad_batch"),
    "BatchL2Grad": (bpext.BatchL2Grad, "batch_l2", BatchL2Grad, "batch_l2"),
    "SumGradSquared": (
        bpext.SumGradSquared,
        "sum_grad_squared",
        SumGradSquared,
        "sum_grad_squared",
    ),
    "Variance": (bpext.Variance, "variance", Variance, "variance"),
}


@pytest.mark.parametrize("extension", ELEMENTWISE)
@pytest.mark.parametrize("setup", SETUPS)
def test_elementwise_parity(setup, extension):
    bp_class, bp_attribute, cx_class, cx_attribute = ELEMENTWISE[extension]
    ours, theirs = both(setup, bp_class(), cx_class())
    for name, our_param, their_param in paired(ours, theirs):
        assert_close(
            getattr(our_param, cx_attribute),
            getattr(their_param, bp_attribute),
            msg=name,
        )


def stacked(model, attribute, names):
    params = dict(model.named_parameters())
    values = [getattr(params[n], attribute) for n in names]
    return torch.cat([v.reshape(*v.shape[:2], -1) for v in values], dim=2)


@pytest.mark.parametrize("setup", SETUPS)
def test_sqrt_ggn_exact_parity(setup):
    ours, theirs = both(setup, bpext.SqrtGGNExact(), SqrtGGN())
    names = list(trainable(ours))
    our_columns = stacked(ours, "sqrt_ggn", names)
    their_columns = stacked(theirs, "sqrt_ggn_exact", names)
    for n in range(our_columns.shape[1]):
        assert_close(
            our_columns[:, n].T @ our_columns[:, n],
            their_columns[:, n].T @ their_columns[:, n],
            msg=f"sample {n}",
        )


def output_positions(model, X, module):
    sizes = []
    handle = module.register_forward_hook(lambda m, i, o: sizes.append(o[0, 0].numel()))
    with torch.no_grad():
        model(X)
    handle.remove()
    return sizes[0]


@pytest.mark.parametrize("setup", SETUPS)
def test_kflr_parity(setup):
    model, loss_fn, X, y = build(setup)
    theirs = run_backpack(model, loss_fn, X, y, bpext.KFLR())
    ours = {
        approx: run_curvext(
            copy.deepcopy(model),
            copy.deepcopy(loss_fn),
            X,
            y,
            KFAC("type-2", kfac_approx=approx),
        )
        for approx in ("expand", "reduce")
    }
    their_modules = dict(theirs.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for approx, extended in ours.items():
                our_module = dict(extended.named_modules())[name]
                for param_name in ("weight", "bias"):
                    assert_close(
                        kron(getattr(our_module, param_name).kfac),
                        kron(getattr(their_modules[name], param_name).kflr),
                        msg=f"{name}.{param_name} ({approx})",
                    )
        elif isinstance(module, nn.Conv2d):
            T = output_positions(model, X, module)
            expand = dict(ours["expand"].named_modules())[name]
            reduce = dict(ours["reduce"].named_modules())[name]
            their_G, their_A = their_modules[name].weight.kflr
            assert_close(reduce.weight.kfac[0], their_G, msg=f"{name} G")
            assert_close(expand.weight.kfac[1] * T, their_A, msg=f"{name} A")
            assert_close(reduce.bias.kfac[0], their_modules[name].bias.kflr[0], msg=name)


# ---------------------------------------------------------------------------
# MC extensions, in expectation
# ---------------------------------------------------------------------------
SEEDS = range(16)
MC_SAMPLES = 1000


def assert_same_expectation(ours: list, theirs: list, label: str):
    ours = torch.stack([o.flatten() for o in ours])
    theirs = torch.stack([t.flatten() for t in theirs])
    difference = (ours.mean(0) - theirs.mean(0)).norm()
    standard_error = (ours.var(0).sum() / len(ours) + theirs.var(0).sum() / len(theirs)).sqrt()
    scale = theirs.mean(0).norm()
    assert difference <= 5 * standard_error + 1e-12 * scale, label
    assert difference <= 0.05 * scale, label


def gram(V):
    return V.T @ V


MC_PAIRS = {
    "DiagGGNMC": (
        lambda: bpext.DiagGGNMC(mc_samples=MC_SAMPLES),
        "diag_ggn_mc",
        lambda: GGNDiag(mc_samples=MC_SAMPLES),
        "ggn_diag",
        lambda value: value,
    ),
    "SqrtGGNMC": (
        lambda: bpext.SqrtGGNMC(mc_samples=MC_SAMPLES),
        "sqrt_ggn_mc",
        lambda: SqrtGGN(mc_samples=MC_SAMPLES),
        "sqrt_ggn",
        lambda value: gram(value.reshape(-1, value[0, 0].numel())),
    ),
}


@pytest.mark.parametrize("pair", MC_PAIRS)
@pytest.mark.parametrize("setup", ["mlp-ce", "mlp-mse-sum", "cnn-ce"])
def test_mc_parity_in_expectation(setup, pair):
    make_bp, bp_attribute, make_cx, cx_attribute, transform = MC_PAIRS[pair]
    ours, theirs = {}, {}
    for seed in SEEDS:
        our_model, their_model = both(setup, make_bp(), make_cx(), seed=seed)
        for name, our_param, their_param in paired(our_model, their_model):
            ours.setdefault(name, []).append(transform(getattr(our_param, cx_attribute)))
            theirs.setdefault(name, []).append(transform(getattr(their_param, bp_attribute)))
    for name, our_values in ours.items():
        assert_same_expectation(our_values, theirs[name], name)


@pytest.mark.parametrize("setup", ["mlp-ce", "mlp-mse-sum"])
def test_kfac_mc_parity_in_expectation(setup):
    """Linear layers only: ``kron`` of the MC factors, in expectation."""
    ours, theirs = {}, {}
    for seed in SEEDS:
        our_model, their_model = both(
            setup,
            bpext.KFAC(mc_samples=MC_SAMPLES),
            KFAC("mc", mc_samples=MC_SAMPLES),
            seed,
        )
        for name, our_param, their_param in paired(our_model, their_model):
            ours.setdefault(name, []).append(kron(our_param.kfac))
            theirs.setdefault(name, []).append(kron(their_param.kfac))
    for name, our_values in ours.items():
        assert_same_expectation(our_values, theirs[name], name)
