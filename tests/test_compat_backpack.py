"""``curvext.compat.backpack`` against the real BackPACK (1.7).

The compat extensions must store BackPACK's attribute names with BackPACK's
numbers: exact quantities agree to float64 round-off, factor by factor
(``KFLR`` on convolutions included) and column by column (``SqrtGGNExact``'s
``C`` columns for cross-entropy). MC quantities are checked through exact
identities between the compat extensions that share one draw, and in
expectation against BackPACK's exact quantities (see ``test_mc_*``).
``install()`` is run in subprocesses so that this process's ``sys.modules``
stays as it is.
"""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import curvext.compat.backpack as compat
from curvext.compat.backpack import extensions as cext

bp = pytest.importorskip("backpack")  # the reference library (test extra)
bpext = pytest.importorskip("backpack.extensions")

# BackPACK's module hooks fire this when the input needs no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def positions():
    """Cross-entropy on ``[N, C, T]``: BackPACK's columns per class and position."""
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1))


def ce_data(*in_shape, classes=3, out_shape=()):
    return lambda N: (torch.randn(N, *in_shape), torch.randint(0, classes, (N, *out_shape)))


def mse_data(*in_shape):
    return lambda N: (torch.randn(N, *in_shape), torch.randn(N, 3))


SETUPS = {
    "mlp-ce": (mlp, nn.CrossEntropyLoss, ce_data(5)),
    "mlp-ce-sum": (mlp, lambda: nn.CrossEntropyLoss(reduction="sum"), ce_data(5)),
    "mlp-mse": (mlp, nn.MSELoss, mse_data(5)),
    "cnn-ce": (cnn, nn.CrossEntropyLoss, ce_data(2, 6, 6)),
    "cnn-ce-sum": (cnn, lambda: nn.CrossEntropyLoss(reduction="sum"), ce_data(2, 6, 6)),
    "cnn-mse": (cnn, nn.MSELoss, mse_data(2, 6, 6)),
    "positions-ce": (positions, nn.CrossEntropyLoss, ce_data(2, 4, out_shape=(4,))),
}


def build(setup, N=5):
    make_model, make_loss, make_data = SETUPS[setup]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, loss_fn = make_model(), make_loss()
        X, y = make_data(N)
    return model, loss_fn, X, y


def run(library, setup, *extensions, **context):
    """The extended copy of the model after one backward under ``library``."""
    model, loss_fn, X, y = build(setup)
    model, loss_fn = library.extend(copy.deepcopy(model)), library.extend(loss_fn)
    loss = loss_fn(model(X), y)
    with library.backpack(*extensions, **context):
        loss.backward()
    return model


def results(model):
    """``{parameter name: {attribute: value}}``, the public attributes only."""
    return {
        name: {key: value for key, value in vars(p).items() if not key.startswith("_")}
        for name, p in model.named_parameters()
    }


def assert_same(ours, theirs, label):
    if isinstance(theirs, (list, tuple)):
        assert isinstance(ours, list) and len(ours) == len(theirs), label
        for index, (mine, reference) in enumerate(zip(ours, theirs)):
            assert_same(mine, reference, f"{label}[{index}]")
        return
    assert ours.shape == theirs.shape, f"{label}: {ours.shape} != {theirs.shape}"
    scale = max(1.0, theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * scale, msg=label)


EXACT = [
    "DiagGGNExact",
    "BatchDiagGGNExact",
    "KFLR",
    "SqrtGGNExact",
    "BatchGrad",
    "BatchL2Grad",
    "SumGradSquared",
    "Variance",
]


@pytest.mark.parametrize("setup", SETUPS)
def test_exact_extensions_store_backpacks_names_and_numbers(setup):
    """All exact extensions in one backward: same attributes, same numbers
    (no curvext names such as ``ggn_diag`` left behind)."""
    theirs = results(run(bp, setup, *(getattr(bpext, name)() for name in EXACT)))
    ours = results(run(compat, setup, *(getattr(cext, name)() for name in EXACT)))
    assert ours.keys() == theirs.keys()
    for param, attributes in theirs.items():
        assert ours[param].keys() == attributes.keys(), param
        for attribute, value in attributes.items():
            assert_same(ours[param][attribute], value, f"{setup} {param}.{attribute}")


@pytest.mark.parametrize("setup", ["mlp-ce", "mlp-mse", "cnn-ce"])
def test_ggnmp_multiplies_like_backpacks(setup):
    """``p.ggnmp(M)``: the same products as BackPACK's block-diagonal GGNMP."""
    theirs = run(bp, setup, bpext.GGNMP())
    ours = run(compat, setup, cext.GGNMP())
    generator = torch.Generator().manual_seed(0)
    for (name, mine), (_, reference) in zip(ours.named_parameters(), theirs.named_parameters()):
        matrix = torch.randn(3, *mine.shape, generator=generator, dtype=mine.dtype)
        assert_same(mine.ggnmp(matrix), reference.ggnmp(matrix), f"{setup} {name}.ggnmp")


@pytest.mark.parametrize("setup", SETUPS)
def test_hessian_diagonals_are_backpacks(setup):
    """``DiagHessian``/``BatchDiagHessian``: BackPACK's names and numbers
    (the models have sigmoid and tanh activations: second-order terms)."""
    names = ["DiagHessian", "BatchDiagHessian"]
    theirs = results(run(bp, setup, *(getattr(bpext, name)() for name in names)))
    ours = results(run(compat, setup, *(getattr(cext, name)() for name in names)))
    assert ours.keys() == theirs.keys()
    for param, attributes in theirs.items():
        assert ours[param].keys() == attributes.keys() == {"diag_h", "diag_h_batch"}, param
        for attribute, value in attributes.items():
            assert_same(ours[param][attribute], value, f"{setup} {param}.{attribute}")


@pytest.mark.parametrize("setup", SETUPS)
def test_kfra_is_backpacks(setup):
    """``KFRA``: BackPACK's factors (batch-averaged backpropagation, BackPACK's
    scaling on convolutions)."""
    theirs = results(run(bp, setup, bpext.KFRA()))
    ours = results(run(compat, setup, cext.KFRA()))
    assert ours.keys() == theirs.keys()
    for param, attributes in theirs.items():
        assert ours[param].keys() == attributes.keys() == {"kfra"}, param
        assert_same(ours[param]["kfra"], attributes["kfra"], f"{setup} {param}.kfra")


@pytest.mark.parametrize("setup", ["mlp-ce", "mlp-mse", "cnn-ce"])
@pytest.mark.parametrize("name, options", [("HMP", {}), ("HMP", {"savefield": "h"})])
def test_hessian_products_are_backpacks(setup, name, options):
    """``p.hmp(M)``: BackPACK's products. (BackPACK 1.7.1's ``PCHMP`` multiplies
    the activations' second-order terms by the output gradient twice, so its
    numbers are not the positive-curvature Hessian; curvext's ``PCHMP`` is
    checked against a dense construction in ``test_hessian_products.py``.)"""
    theirs = run(bp, setup, getattr(bpext, name)(**options))
    ours = run(compat, setup, getattr(cext, name)(**options))
    field = options.get("savefield", name.lower())
    generator = torch.Generator().manual_seed(0)
    for (param, mine), (_, reference) in zip(ours.named_parameters(), theirs.named_parameters()):
        matrix = torch.randn(3, *mine.shape, generator=generator, dtype=mine.dtype)
        label = f"{setup} {param}.{field}"
        assert_same(getattr(mine, field)(matrix), getattr(reference, field)(matrix), label)


def test_subsampling():
    extensions = ("BatchGrad", {"subsampling": [3, 0]}), ("SqrtGGNExact", {"subsampling": [1]})
    theirs = results(run(bp, "cnn-ce", *(getattr(bpext, n)(**kw) for n, kw in extensions)))
    ours = results(run(compat, "cnn-ce", *(getattr(cext, n)(**kw) for n, kw in extensions)))
    for param, attributes in theirs.items():
        assert ours[param].keys() == attributes.keys()
        for attribute, value in attributes.items():
            assert_same(ours[param][attribute], value, f"{param}.{attribute}")


class FlattenedSequence(nn.Module):
    """Logits ``[N, T, C]`` flattened to ``[N·T, C]`` rows (curvext: N samples)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(7, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.out(self.embed(x)).reshape(-1, 4)


BEYOND_BACKPACK = {
    "weighted-smoothed": lambda: (
        nn.Linear(3, 5),
        nn.CrossEntropyLoss(weight=torch.rand(5), label_smoothing=0.1),
        torch.randn(6, 3),
        torch.randint(0, 5, (6,)),
    ),
    "flattened-sequence": lambda: (
        FlattenedSequence(),
        nn.CrossEntropyLoss(),
        torch.randint(0, 7, (3, 4)),
        torch.randint(0, 4, (12,)),
    ),
    "ignore-index-positions": lambda: (
        nn.Conv1d(2, 4, 1),
        nn.CrossEntropyLoss(ignore_index=1),
        torch.randn(3, 2, 5),
        torch.randint(0, 4, (3, 5)),
    ),
}


@pytest.mark.parametrize("case", BEYOND_BACKPACK)
def test_sqrt_ggn_exact_beyond_backpack_is_a_root_of_curvexts_ggn(case):
    """Cross-entropy settings BackPACK refuses: the ``C`` columns per position
    still factor curvext's per-sample GGN (class weights, label smoothing,
    ignored positions, rows of a flattened sequence)."""
    from curvext import backpack, extend
    from curvext.extensions import SqrtGGN

    model, loss_fn, X, y = BEYOND_BACKPACK[case]()
    grams = []
    for extension, attribute in (SqrtGGN(), "sqrt_ggn"), (cext.SqrtGGNExact(), "sqrt_ggn_exact"):
        copied = extend(copy.deepcopy(model))
        loss = extend(copy.deepcopy(loss_fn))(copied(X), y)
        with backpack(extension):
            loss.backward()
        V = torch.cat([getattr(p, attribute).flatten(2) for p in copied.parameters()], dim=2)
        grams.append(torch.einsum("knp,knq->npq", V, V))
    assert_same(grams[1], grams[0], case)


# ---------------------------------------------------------------------------
# MC extensions
# ---------------------------------------------------------------------------
# The compat MC extensions with the same number of samples share one draw
# (curvext draws the columns of a sample count once per backward), which gives
# exact identities between them; the draw itself is checked in expectation
# against BackPACK's exact quantities, using the M columns of SqrtGGNMC as M
# independent estimates.
MC_SAMPLES = 2000


def per_column(sqrt_mc):
    """``M`` independent estimates ``M · Σ_n v_mn²`` of the GGN diagonal, ``[M, *p.shape]``."""
    return sqrt_mc.square().sum(1) * sqrt_mc.shape[0]


def assert_same_expectation(estimates, expected, label):
    """``estimates [M, ...]`` (independent, unbiased) average to ``expected``.

    ``E‖mean - expected‖² = Σ Var/M`` whatever the correlations, so 5 times its
    square root bounds the error of the mean with probability >= 1 - 1/25 by
    Markov's inequality and far more in practice (for Gaussian errors it is
    exceeded with probability < 1e-6); the seed is fixed, so the test is
    deterministic. The second bound keeps the check meaningful: M = 2000
    samples put the mean within 2 % of the exact value here (5 % allowed).
    """
    difference = (estimates.mean(0) - expected).norm()
    standard_error = (estimates.var(0).sum() / estimates.shape[0]).sqrt()
    assert difference <= 5 * standard_error + 1e-12, label
    assert difference <= 0.05 * expected.norm() + 1e-12, label


def shapes(value):
    return [factor.shape for factor in value] if isinstance(value, list) else value.shape


MC = ["DiagGGNMC", "BatchDiagGGNMC", "KFAC", "SqrtGGNMC"]


@pytest.mark.parametrize("setup", ["mlp-ce", "cnn-ce", "mlp-mse"])
def test_mc_extensions(setup):
    theirs_mc = results(
        run(bp, setup, *(getattr(bpext, name)(mc_samples=MC_SAMPLES) for name in MC))
    )
    theirs = results(run(bp, setup, bpext.DiagGGNExact(), bpext.KFLR()))
    ours = results(run(compat, setup, *(getattr(cext, name)(MC_SAMPLES) for name in MC)))
    modules = {}
    for param in ours:
        modules.setdefault(param.rsplit(".", 1)[0], []).append(param)
    for param, attributes in ours.items():
        # BackPACK's names and shapes
        assert attributes.keys() == theirs_mc[param].keys(), param
        for attribute, value in attributes.items():
            assert shapes(value) == shapes(theirs_mc[param][attribute]), f"{param}.{attribute}"
        # one draw: the diagonals are the squared columns of the square root
        sqrt_mc = attributes["sqrt_ggn_mc"]
        assert_same(attributes["diag_ggn_mc"], sqrt_mc.square().sum((0, 1)), param)
        assert_same(attributes["diag_ggn_mc_batch"], sqrt_mc.square().sum(0), param)
        # in expectation: BackPACK's exact diagonal
        assert_same_expectation(per_column(sqrt_mc), theirs[param]["diag_ggn_exact"], param)
    for module, params in modules.items():
        # KFAC's output factor is the Gram matrix of the bias's columns (one
        # draw), whose expectation is KFLR's; the input factor is KFLR's
        bias = ours[f"{module}.bias"]["sqrt_ggn_mc"]  # [M, N, out]: summed over positions
        estimates = torch.einsum("mni,mnj->mij", bias, bias) * MC_SAMPLES
        for param in params:
            kfac, kflr = ours[param]["kfac"], theirs[param]["kflr"]
            assert_same(kfac[0], estimates.mean(0), param)
            assert_same_expectation(estimates, kflr[0], param)
            if len(kflr) == 2:
                assert_same(kfac[1], kflr[1], param)


# ---------------------------------------------------------------------------
# Refusals, hooks, bookkeeping
# ---------------------------------------------------------------------------
def test_every_backpack_extension_exists():
    assert set(bpext.__all__) == set(cext.__all__)
    assert all(hasattr(cext, name) for name in bpext.__all__)


TRANSPOSED = {
    "1d": (nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1), (4,)),
    "2d": (nn.ConvTranspose2d(2, 3, (2, 3), dilation=(1, 2)), (3, 3)),
    "3d": (nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 2, 2)),
}


@pytest.mark.parametrize("name", ["KFLR", "KFAC", "KFRA"])
@pytest.mark.parametrize("dims", TRANSPOSED)
def test_kronecker_factors_of_transposed_convolutions_are_backpacks(dims, name):
    """BackPACK factors ``weight.transpose(0, 1)``: ``[G, A]`` with ``A`` from
    the input spread over the output positions (KFAC: the same draw through
    the same seed gives different labels, so only the deterministic ``A``)."""
    layer, spatial = TRANSPOSED[dims]
    torch.manual_seed(6)
    base = nn.Sequential(copy.deepcopy(layer), nn.Sigmoid(), nn.Flatten()).double()
    X = torch.randn(3, 2, *spatial, dtype=torch.float64)
    y = torch.randn_like(base(X))
    stored = []
    for library, extensions in ((compat, cext), (bp, bpext)):
        model = library.extend(copy.deepcopy(base))
        loss = library.extend(nn.MSELoss())(model(X), y)
        with pytest.warns(UserWarning, match="transpose"):
            with library.backpack(getattr(extensions, name)()):
                loss.backward()
        stored.append([getattr(p, name.lower()) for p in model.parameters()])
    for ours, theirs in zip(*stored):
        if name != "KFAC":
            assert_same(ours, theirs, name)
        else:  # only A: MC draws differ
            assert [f.shape for f in ours] == [f.shape for f in theirs]
            if len(ours) == 2:
                assert_same(ours[1], theirs[1], name)


def test_kfra_refuses_a_transposed_convolution_called_twice():
    layer = compat.extend(nn.ConvTranspose1d(2, 2, 1))
    out = layer(layer(torch.randn(3, 2, 4)))
    loss = compat.extend(nn.MSELoss())(out.flatten(1), torch.randn(3, 8))
    with pytest.raises(NotImplementedError, match="called 2 times.*KFLR"):
        with compat.backpack(cext.KFRA()):
            loss.backward()


@pytest.mark.parametrize(
    "layer, call",
    [
        (nn.ConvTranspose2d(2, 4, 2, groups=2), {}),
        (nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1), {}),
        (nn.ConvTranspose2d(2, 3, 3, stride=2), {"output_size": [8, 8]}),
    ],
    ids=["groups", "output_padding", "output_size"],
)
@pytest.mark.parametrize("name", ["KFLR", "KFRA"])
def test_kflr_refuses_transposed_convolutions_backpack_has_no_factors_for(layer, call, name):
    model = compat.extend(copy.deepcopy(layer))
    out = model(torch.randn(2, 2, 3, 3), **call)
    loss = compat.extend(nn.MSELoss())(out.flatten(1), torch.randn_like(out.flatten(1)))
    with pytest.raises(NotImplementedError, match="ConvTranspose2d.*curvext.extensions.KFAC"):
        with compat.backpack(getattr(cext, name)()):
            loss.backward()


def batchnorm_train_model():
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)
    ).double()


@pytest.mark.parametrize("with_loss", [True, False], ids=["loss", "no-loss"])
def test_batch_grad_with_batchnorm_in_train_mode_is_backpacks(with_loss):
    """BackPACK's ``BatchGrad`` warns and computes from the gradient arriving at
    each module output (rows summing to the gradient); so does the compat one."""
    base = batchnorm_train_model()
    X, y = torch.randn(6, 2, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    stored = []
    for library, extensions in ((compat, cext), (bp, bpext)):
        model = library.extend(copy.deepcopy(base))
        out = model(X)
        loss = library.extend(nn.CrossEntropyLoss())(out, y) if with_loss else out[:, 1].sum()
        with pytest.warns(UserWarning, match="train"):
            with library.backpack(extensions.BatchGrad()):
                loss.backward()
        stored.append([(p.grad_batch, p.grad) for p in model.parameters()])
    for (ours, grad), (theirs, their_grad) in zip(*stored):
        assert_same(ours, theirs, "grad_batch")
        torch.testing.assert_close(ours.sum(0), grad)
        torch.testing.assert_close(grad, their_grad)


@pytest.mark.parametrize("name", ["BatchL2Grad", "SumGradSquared", "Variance"])
def test_other_first_order_extensions_refuse_batchnorm_in_train_mode(name):
    """As BackPACK's (which raise); and curvext's own BatchGrad refuses too."""
    from curvext import backpack as curvext_backpack
    from curvext.extensions import BatchGrad

    for context, extension in (
        (compat.backpack, getattr(cext, name)()),
        (curvext_backpack, BatchGrad()),
    ):
        model = compat.extend(batchnorm_train_model())
        X, y = torch.randn(6, 2, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        loss = compat.extend(nn.CrossEntropyLoss())(model(X), y)
        with pytest.raises(RuntimeError, match="BatchNorm1d.*batch statistics.*model.eval"):
            with context(extension):
                loss.backward()


def test_real_backpack_extensions_are_refused():
    with pytest.raises(TypeError, match="real BackPACK.*compat.backpack.extensions.DiagGGNExact"):
        compat.backpack(bpext.DiagGGNExact())


def test_renamed_results_are_cleaned_up_like_curvexts():
    model = run(compat, "cnn-ce", cext.SqrtGGNExact(), cext.KFLR())
    X, y = build("cnn-ce")[2:]
    loss = compat.extend(nn.CrossEntropyLoss())(model(X), y)
    with compat.backpack(cext.BatchGrad()):
        loss.backward()
    assert all(results(model)[name].keys() == {"grad_batch"} for name in results(model))


def test_extension_hook_sees_each_module_with_its_results():
    seen = []

    def hook(module):
        seen.append(module)
        assert all(hasattr(p, "diag_ggn_exact") for p in module.parameters())

    model = run(compat, "cnn-ce", cext.DiagGGNExact(), extension_hook=hook, retain_graph=True)
    with_params = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert sorted(map(id, seen)) == sorted(map(id, with_params))


def test_disable_and_memory_cleanup():
    model = compat.extend(nn.Linear(3, 2))
    with compat.disable():
        assert not compat.disable.should_store_io()
        loss = compat.extend(nn.MSELoss())(model(torch.randn(4, 3)), torch.randn(4, 2))
    assert compat.disable.should_store_io()
    compat.memory_cleanup(model)
    with pytest.raises(RuntimeError, match="computed nothing"):
        with compat.backpack(cext.DiagGGNExact()):
            loss.backward()


# ---------------------------------------------------------------------------
# install(), in fresh interpreters
# ---------------------------------------------------------------------------
def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_install_runs_backpack_code_unchanged():
    result = run_python(
        """
        import sys
        import curvext, curvext.compat
        assert not any(n.split(".")[0] == "backpack" for n in sys.modules), "imported early"
        assert "curvext.compat.backpack" not in sys.modules

        import curvext.compat.backpack
        curvext.compat.backpack.install()
        curvext.compat.backpack.install()  # idempotent

        # BackPACK user code, unchanged
        import torch
        import backpack.extensions
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                           torch.nn.Linear(4, 2)))
        lossfunc = extend(torch.nn.CrossEntropyLoss())
        loss = lossfunc(model(torch.randn(5, 3)), torch.randint(0, 2, (5,)))
        with backpack(DiagGGNExact()):
            loss.backward()
        for p in model.parameters():
            assert p.diag_ggn_exact.shape == p.shape

        assert sys.modules["backpack"] is curvext.compat.backpack
        assert backpack.__module__ == "curvext.compat.backpack"

        # the helper modules BackPACK's clients import (Cockpit, laplace-torch)
        from backpack.context import CTX
        from backpack.core.derivatives.convnd import weight_jac_t_save_memory
        from backpack.extensions.backprop_extension import BackpropExtension
        from backpack.hessianfree.hvp import hessian_vector_product
        from backpack.utils.convert_parameters import vector_to_parameter_list
        import backpack.utils.convert_parameters as convert

        assert isinstance(DiagGGNExact(), BackpropExtension)
        loss = lossfunc(model(torch.randn(5, 3)), torch.randint(0, 2, (5,)))
        with backpack(DiagGGNExact()):
            assert CTX.is_extension_active(DiagGGNExact) and CTX.get_active_exts()
            loss.backward()  # a context that computes nothing is refused at exit
        assert not CTX.is_extension_active(DiagGGNExact)
        CTX.remove_hooks()
        with weight_jac_t_save_memory(save_memory=True):
            pass
        params = list(model.parameters())
        flat = convert.parameters_to_vector(params)
        views = vector_to_parameter_list(flat, params)
        assert all(torch.equal(a, b) for a, b in zip(views, params))
        # H v against the dense Hessian of a quadratic form: f = x^T A x / 2 has H = sym(A)
        x = torch.randn(3, requires_grad=True, dtype=torch.float64)
        A = torch.randn(3, 3, dtype=torch.float64)
        v = torch.randn(3, dtype=torch.float64)
        (Hv,) = hessian_vector_product(x @ A @ x / 2, [x], [v])
        assert torch.allclose(Hv, (A + A.T) / 2 @ v)

        try:
            import backpack.utils.hooks  # internal
        except ModuleNotFoundError as error:
            assert "compatibility layer" in str(error) and "not its internals" in str(error)
        else:
            raise AssertionError("backpack.utils.hooks imported")
        # BackPACK's derivative classes import (its test helpers need them) and refuse
        from backpack.core.derivatives.linear import LinearDerivatives
        try:
            LinearDerivatives()
        except NotImplementedError as error:
            assert "internal derivative classes" in str(error), error
        else:
            raise AssertionError("LinearDerivatives constructed")
        # the public helpers, by BackPACK's paths
        from backpack.custom_module.branching import Parallel
        from backpack.extensions.secondorder.hbp import HBP, LossHessianStrategy
        from backpack.hessianfree.ggnvp import ggn_vector_product
        from backpack.utils import kroneckers
        from backpack.utils.examples import autograd_diag_ggn_exact
        assert kroneckers.kfacs_to_mat is curvext.compat.backpack.utils.kfacs_to_mat

        curvext.compat.backpack.uninstall()
        assert "backpack" not in sys.modules and "backpack.extensions" not in sys.modules
        from curvext.compat.backpack import utils as compat_utils
        assert not hasattr(compat_utils, "convert_parameters")  # install's attributes gone
        assert not hasattr(compat_utils, "__path__")
        import backpack  # the real one again
        assert backpack.__file__.endswith("backpack/__init__.py"), backpack.__file__
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_install_after_real_backpack_import_raises():
    result = run_python(
        """
        import backpack
        import curvext.compat.backpack
        try:
            curvext.compat.backpack.install()
        except RuntimeError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "real BackPACK is imported" in result.stdout
    assert "before anything imports backpack" in result.stdout


def test_converter_and_fail_modes_exist_with_backpacks_values():
    """Names BackPACK's own tests and clients import: the converter (curvext
    needs none: the module itself) and the ``fail_mode`` strings."""
    model = nn.Sequential(nn.Linear(2, 2))
    assert compat.convert_module_to_backpack(model, False) is model
    real = pytest.importorskip("backpack.extensions.backprop_extension")
    assert (cext.FAIL_ERROR, cext.FAIL_WARN, cext.FAIL_SILENT) == (
        real.FAIL_ERROR,
        real.FAIL_WARN,
        real.FAIL_SILENT,
    )
