"""BackPACK's public helpers in ``curvext.compat.backpack``: custom modules,
``hessianfree``, ``utils`` and ``HBP``, against dense float64 references and
the real BackPACK.

References: Jacobians and Hessians by ``torch.autograd.functional`` in
float64, Kronecker products written entry by entry, inverses by
``torch.linalg.inv``, convolutions by the layers themselves (a convolution
is its weight times the unfolded input).
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

import curvext.compat.backpack as compat
from curvext.compat.backpack import custom_module as cm
from curvext.compat.backpack import extensions as cext
from curvext.compat.backpack import hessianfree, utils

bp = pytest.importorskip("backpack")  # the reference library (test extra)
bpext = pytest.importorskip("backpack.extensions")

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------
# hessianfree: J v, Jᵀ w, Jᵀ H J v against dense Jacobians and Hessians
# ---------------------------------------------------------------------------
def small_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    names = [name for name, _ in model.named_parameters()]
    sizes = [p.numel() for p in params]

    def output_of(vector):  # differentiable in vector (unlike .data views)
        views = [v.view_as(p) for v, p in zip(vector.split(sizes), params)]
        return torch.func.functional_call(model, dict(zip(names, views)), (X,))

    return model, X, y, params, flat, output_of


def test_jacobian_products_match_the_dense_jacobian():
    model, X, y, params, flat, output_of = small_problem()
    J = jacobian(output_of, flat).reshape(-1, flat.numel())  # [N*C, P]
    output = model(X)
    v = torch.randn(flat.numel())
    w = torch.randn_like(output)
    (Jv,) = hessianfree.R_op(output, params, utils.vector_to_parameter_list(v, params))
    torch.testing.assert_close(Jv.flatten(), J @ v)
    (Jv_too,) = hessianfree.jacobian_vector_product(
        output, params, utils.vector_to_parameter_list(v, params)
    )
    torch.testing.assert_close(Jv_too, Jv)
    JTw = hessianfree.L_op(output, params, w)
    torch.testing.assert_close(torch.cat([t.flatten() for t in JTw]), J.T @ w.flatten())
    JTw_too = hessianfree.transposed_jacobian_vector_product(output, params, w)
    assert all(torch.equal(a, b) for a, b in zip(JTw, JTw_too))


def test_ggn_vector_products_match_the_dense_ggn():
    model, X, y, params, flat, output_of = small_problem()
    loss_fn = nn.CrossEntropyLoss()
    output = model(X)
    J = jacobian(output_of, flat).reshape(-1, flat.numel())
    H = hessian(lambda out: loss_fn(out.reshape(output.shape), y), output.detach().flatten())
    ggn = J.T @ H @ J
    v = torch.randn(flat.numel())
    product = hessianfree.ggn_vector_product(
        loss_fn(output, y), output, model, utils.vector_to_parameter_list(v, params)
    )
    torch.testing.assert_close(torch.cat([t.flatten() for t in product]), ggn @ v)
    # a sub-block: the last layer's weight and bias
    block = slice(flat.numel() - 10, flat.numel())
    part = hessianfree.ggn_vector_product_from_plist(
        loss_fn(output, y), output, params[2:], utils.vector_to_parameter_list(v[block], params[2:])
    )
    torch.testing.assert_close(torch.cat([t.flatten() for t in part]), ggn[block, block] @ v[block])
    diagonal = utils.autograd_diag_ggn_exact(X, y, model, loss_fn)
    torch.testing.assert_close(diagonal, ggn.diagonal())
    torch.testing.assert_close(
        utils.autograd_diag_ggn_exact(X, y, model, loss_fn, idx=[0, 7]), ggn.diagonal()[[0, 7]]
    )


def test_unused_parameters_get_zeros():
    x = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    (jv_x, jv_unused) = hessianfree.L_op((2 * x).sum(), [x, unused], torch.tensor(1.0))
    torch.testing.assert_close(jv_x, torch.full((3,), 2.0))
    torch.testing.assert_close(jv_unused, torch.zeros(2))


# ---------------------------------------------------------------------------
# utils.kroneckers against entry-by-entry products and dense inverses
# ---------------------------------------------------------------------------
def kron_by_entries(A, B):
    out = torch.empty(A.shape[0] * B.shape[0], A.shape[1] * B.shape[1])
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            for k in range(B.shape[0]):
                for m in range(B.shape[1]):
                    out[i * B.shape[0] + k, j * B.shape[1] + m] = A[i, j] * B[k, m]
    return out


def test_kronecker_products_and_inverses():
    torch.manual_seed(1)
    A, B, C = torch.randn(2, 3), torch.randn(4, 2), torch.randn(3, 3)
    dense = kron_by_entries(kron_by_entries(A, B), C)
    torch.testing.assert_close(utils.kfacs_to_mat([A, B, C]), dense)
    torch.testing.assert_close(utils.two_kfacs_to_mat(A, B), kron_by_entries(A, B))
    M = torch.randn(dense.shape[1], 5)
    torch.testing.assert_close(utils.apply_kfac_mat_prod([A, B, C], M), dense @ M)
    torch.testing.assert_close(utils.kfac_mat_prod([A, B, C])(M[:, 0]), dense @ M[:, 0])
    assert utils.is_matrix(A) and utils.is_vector(M[:, 0]) and not utils.is_vector(A)
    S1, S2 = A @ A.T + torch.eye(2), C @ C.T + torch.eye(3)
    inverses = utils.inv_kfacs([S1, S2], shift=[0.5, 0.1])
    torch.testing.assert_close(inverses[0], torch.linalg.inv(S1 + 0.5 * torch.eye(2)))
    torch.testing.assert_close(inverses[1], torch.linalg.inv(S2 + 0.1 * torch.eye(3)))
    N = torch.randn(6, 2)
    expected = torch.linalg.inv(kron_by_entries(S1, S2) + 0 * torch.eye(6)) @ N
    torch.testing.assert_close(utils.apply_inv_kfac_mat_prod([S1, S2], N), expected)
    with pytest.raises(ValueError, match="2 shifts for 1 factors"):
        utils.inv_kfacs([S1], shift=[0.1, 0.2])
    with pytest.raises(ValueError, match="two matrices"):
        utils.two_kfacs_to_mat(A, M[:, 0])
    # a size that merely divides is refused (it would be reshaped into nonsense)
    with pytest.raises(ValueError, match="expected a matrix \\[18, V\\]"):
        utils.apply_kfac_mat_prod([A, B, C], torch.randn(12, 4))


# ---------------------------------------------------------------------------
# utils.conv / conv_transpose: the layer is its weight times the unfolded input
# ---------------------------------------------------------------------------
CONVS = [
    nn.Conv1d(2, 3, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(2, 3, (2, 3), padding=(1, 0), dilation=(1, 2), bias=False),
    nn.Conv3d(2, 3, 2, stride=(1, 2, 1), bias=False),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: type(c).__name__)
def test_unfolded_input_reproduces_the_convolution(conv):
    conv = copy.deepcopy(conv).double()
    x = torch.randn(2, 2, *[7] * (conv.weight.dim() - 2))
    unfolded = utils.unfold_input(conv, x)  # [N, C_in * K, L]
    output = conv(x)
    product = torch.einsum("oi,nil->nol", conv.weight.flatten(1), unfolded)
    torch.testing.assert_close(product, output.flatten(2))
    torch.testing.assert_close(utils.unfold_by_conv(x, conv), unfolded)


TRANSPOSED = [
    nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, bias=False),
    nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), dilation=(1, 2), bias=False),
    nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False),
]


@pytest.mark.parametrize("conv", TRANSPOSED, ids=lambda c: type(c).__name__)
def test_unfolded_input_reproduces_the_transposed_convolution(conv):
    conv = copy.deepcopy(conv).double()
    x = torch.randn(2, 2, *[4] * (conv.weight.dim() - 2))
    unfolded = utils.unfold_by_conv_transpose(x, conv)  # [N, C_in * K, X]
    output = conv(x)
    weight = conv.weight.flatten(2)  # [C_in, C_out, K]
    product = torch.einsum("cok,nckx->nox", weight, unfolded.reshape(2, 2, weight.shape[2], -1))
    torch.testing.assert_close(product, output.flatten(2))


def test_subsample():
    x = torch.arange(12.0).reshape(3, 4)
    assert utils.subsample(x) is x
    torch.testing.assert_close(utils.subsample(x, dim=1, subsampling=[3, 0]), x[:, [3, 0]])


# ---------------------------------------------------------------------------
# custom modules: the operations they name, in models on curvext and BackPACK
# ---------------------------------------------------------------------------
def test_custom_modules_compute_the_operations_they_name():
    x = torch.randn(2, 3, 4)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    torch.testing.assert_close(cm.Parallel(first, second)(x), first(x) + second(x))
    torch.testing.assert_close(cm.Permute(0, 2, 1)(x), x.permute(0, 2, 1))
    torch.testing.assert_close(cm.Permute(1, 2, init_transpose=True)(x), x.transpose(1, 2))
    assert cm.ReduceTuple(index=1)((x, 2 * x)) is not x
    torch.testing.assert_close(cm.ReduceTuple(index=1)((x, 2 * x)), 2 * x)
    torch.testing.assert_close(cm.ScaleModule(0.5)(x), 0.5 * x)
    torch.testing.assert_close(cm.Pad((1, 2))(x), nn.functional.pad(x, (1, 2)))
    torch.testing.assert_close(cm.Slicing((slice(None), 1))(x), x[:, 1])
    with pytest.raises(ValueError, match="axis 0 holds the samples"):
        cm.Permute(1, 0, 2)
    with pytest.raises(ValueError, match="axis 0 holds the samples"):
        cm.Permute(0, 1, init_transpose=True)
    with pytest.raises(ValueError, match="weight must be a float"):
        cm.ScaleModule(2)
    with pytest.raises(AssertionError, match="one shape"):
        cm.SumModule()(x, x[:, :1])


def branched_model(library_modules):
    """A residual block, padding, slicing and a permutation built from custom
    modules, on inputs ``[N, 2, 6]``."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 5),
        library_modules.Parallel(
            nn.Sequential(nn.Linear(5, 5), nn.Sigmoid(), library_modules.ScaleModule(0.5)),
            nn.Identity(),
        ),
        nn.Linear(5, 6),
        library_modules.Pad((1, 1)),
        library_modules.Slicing((slice(None), slice(None), slice(0, 7))),
        library_modules.Permute(0, 2, 1),
        nn.Flatten(),
        nn.Linear(14, 3),
    )


def test_models_of_custom_modules_give_backpacks_numbers():
    import backpack.custom_module.branching as bp_branching
    import backpack.custom_module.pad as bp_pad
    import backpack.custom_module.permute as bp_permute
    import backpack.custom_module.scale_module as bp_scale
    import backpack.custom_module.slicing as bp_slicing

    class Real:
        Parallel = bp_branching.Parallel
        Pad = bp_pad.Pad
        Permute = bp_permute.Permute
        ScaleModule = bp_scale.ScaleModule
        Slicing = bp_slicing.Slicing

    torch.manual_seed(4)
    X, y = torch.randn(5, 2, 6), torch.randint(0, 3, (5,))
    stored = []
    for library, modules, extension in (
        (compat, cm, cext.DiagGGNExact),
        (bp, Real, bpext.DiagGGNExact),
    ):
        model = library.extend(branched_model(modules))
        loss = library.extend(nn.CrossEntropyLoss())(model(X), y)
        with library.backpack(extension()):
            loss.backward()
        stored.append([p.diag_ggn_exact for p in model.parameters()])
    for ours, theirs in zip(*stored):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# HBP and set_module_extension
# ---------------------------------------------------------------------------
LHS, BPS = cext.LossHessianStrategy, cext.BackpropStrategy
HBP_CONFIGURATIONS = {
    "kflr": ("ggn", LHS.EXACT, BPS.SQRT),
    "kfra": ("ggn", LHS.SUM, BPS.BATCH_AVERAGE),
    "kfra-hessian": ("hessian", LHS.SUM, BPS.BATCH_AVERAGE),
    "kfra-pch-abs": ("pch-abs", LHS.SUM, BPS.BATCH_AVERAGE),
    "kfra-pch-clip": ("pch-clip", LHS.SUM, BPS.BATCH_AVERAGE),
}


@pytest.mark.parametrize("name", HBP_CONFIGURATIONS)
def test_hbp_configurations_are_backpacks(name):
    """``HBP(...)`` of curvext and of BackPACK, same configuration: the same factors."""
    import backpack.extensions.secondorder.hbp as bp_hbp

    torch.manual_seed(5)
    base = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    stored = []
    for library, hbp in ((compat, cext), (bp, bp_hbp)):
        model = library.extend(copy.deepcopy(base))
        loss = library.extend(nn.CrossEntropyLoss())(model(X), y)
        extension = hbp.HBP(*HBP_CONFIGURATIONS[name], hbp.ExpectationApproximation.BOTEV_MARTENS)
        with library.backpack(extension):
            loss.backward()
        stored.append([p.hbp for p in model.parameters()])
    for ours, theirs in zip(*stored):
        assert len(ours) == len(theirs)
        for mine, reference_factor in zip(ours, theirs):
            torch.testing.assert_close(mine, reference_factor, rtol=1e-9, atol=1e-12)


def test_hbp_refuses_what_curvext_does_not_compute():
    ea = cext.ExpectationApproximation.BOTEV_MARTENS
    with pytest.raises(NotImplementedError, match="hessian.*batch-averaged.*HMP\\(\\)"):
        cext.HBP(cext.Curvature.HESSIAN, LHS.EXACT, BPS.SQRT, ea)
    with pytest.raises(NotImplementedError, match="sampling.*average.*KFRA \\(sum, average\\)"):
        cext.HBP(cext.Curvature.GGN, LHS.SAMPLING, BPS.BATCH_AVERAGE, ea)
    with pytest.raises(ValueError, match="unknown Curvature 'fisher'"):
        cext.HBP("fisher", LHS.SUM, BPS.BATCH_AVERAGE, ea)
    with pytest.raises(NotImplementedError, match="BOTEV_MARTENS"):
        cext.HBP("ggn", LHS.SUM, BPS.BATCH_AVERAGE, cext.ExpectationApproximation.CHEN)
    kfac = cext.HBP(cext.Curvature.GGN, LHS.SAMPLING, BPS.SQRT, ea, savefield="mine")
    assert isinstance(kfac, cext.KFAC) and kfac.savefield == "mine"
    # as in BackPACK, KFAC, KFLR and KFRA are HBPs
    assert all(isinstance(ext, cext.HBP) for ext in (cext.KFAC(), cext.KFLR(), cext.KFRA()))


def test_set_module_extension_is_accepted_and_announced():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.weight

    class ScaleBatchGrad(cext.FirstOrderModuleExtension):
        def __init__(self):
            super().__init__(params=["weight"])

        def weight(self, ext, module, g_inp, g_out, backproped):
            raise AssertionError("curvext does not call BackPACK module extensions")

    grad_batch = cext.BatchGrad()
    grad_batch.set_module_extension(Scale, ScaleBatchGrad())
    with pytest.raises(ValueError, match="Scale maps to .*overwrite=True"):
        grad_batch.set_module_extension(Scale, ScaleBatchGrad())
    grad_batch.set_module_extension(Scale, ScaleBatchGrad(), overwrite=True)
    with pytest.raises(ValueError, match="Linear maps to curvext's LinearRule"):
        grad_batch.set_module_extension(nn.Linear, ScaleBatchGrad())
    with pytest.raises(NotImplementedError, match="declares parameter 'bias'"):
        cext.FirstOrderModuleExtension(params=["bias"])

    model = compat.extend(nn.Sequential(nn.Linear(2, 3), Scale()))
    X, y = torch.randn(4, 2), torch.randn(4, 3)
    loss = compat.extend(nn.MSELoss(reduction="sum"))(model(X), y)
    with pytest.warns(UserWarning, match="extensions for Scale, which curvext does not call"):
        context = compat.backpack(grad_batch)
    with context:
        loss.backward()
    # per-sample gradients of the sum loss: 2 (z_n - y_n) * h_n, h_n the Linear output
    hidden = model[0](X)
    expected = 2 * (hidden * model[1].weight - y) * hidden
    torch.testing.assert_close(model[1].weight.grad_batch, expected.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.backpack(cext.BatchGrad())  # no module extensions: no warning
