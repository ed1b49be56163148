r"""``GGNDirectionalDerivatives`` and ``DampedNewtonStep`` against dense references.

The dense GGN ``Jᵀ H J``, the per-sample GGNs ``G_n`` and the per-sample
gradients ``g_n`` come from ``tests/references.py`` (``torch.func`` only, float64).
The directions ``e_k`` are the top eigenvectors of a dense eigendecomposition;
``γ_nk = N g_nᵀ e_k`` and ``λ_nk = N e_kᵀ G_n e_k`` (ViViT's scaling) are
compared up to the sign of each ``e_k`` (one sign per column of ``γ``; ``λ``
and the Newton step do not depend on it). The damped Newton step is checked
against a dense solve of ``(Eᵀ G E + diag δ) c = -Eᵀ ∇L``, ``s = E c``.
"""

import math

import pytest
import torch

from curvext import backpack, extend
from curvext.extensions import (
    BatchGrad,
    DampedNewtonStep,
    GGNDirectionalDerivatives,
    GGNEigen,
    SqrtGGN,
)
from tests.cases import (
    CASES_BY_NAME,
    assert_close,
    dense_reference,
    layer_groups,
    run_case,
    run_curvext,
    trainable,
)

CASE_NAMES = (
    "mlp_ce",
    "mlp_mse_sum",
    "mse_multidim",
    "residual_cnn",
    "sequence",
    "single_position_convs",
)
TOP_K = 3


def names_of(model, params):
    """Reference names of ``params`` (parameters of ``model``)."""
    names = {id(p): name for name, p in trainable(model).items()}
    return [names[id(p)] for p in params]


def dense_directions(ggn, top_k):
    """Top ``top_k`` eigenvalues (largest first) and eigenvectors ``[P, k]`` of ``ggn``."""
    evals, evecs = torch.linalg.eigh(ggn)
    return evals.flip(0)[:top_k], evecs.flip(1)[:, :top_k]


def reference_derivatives(reference, names, directions):
    """``γ [N, k]``, ``λ [N, k]`` (ViViT's scaling) along ``directions [P, k]``."""
    N = reference.N
    grads = torch.cat([reference.per_sample_grads(n).reshape(N, -1) for n in names], 1)
    per_sample_ggn = reference.per_sample_ggn(names)
    gammas = N * grads @ directions
    lambdas = N * torch.einsum("pk,npq,qk->nk", directions, per_sample_ggn, directions)
    return gammas, lambdas


def assert_up_to_sign(gammas, expected, msg=""):
    """``gammas`` equals ``expected`` up to one sign per column."""
    signs = torch.sign((gammas * expected).sum(0))
    signs[signs == 0] = 1
    assert_close(gammas * signs, expected, rtol=1e-6, atol=1e-8, msg=msg)


def check_group(gammas, lambdas, reference, names, evals, msg=""):
    ggn = reference.ggn(names)
    dense_evals, directions = dense_directions(ggn, len(evals))
    assert_close(evals, dense_evals, rtol=1e-6, atol=1e-10, msg=f"{msg}: eigenvalues")
    expected_gammas, expected_lambdas = reference_derivatives(reference, names, directions)
    assert_up_to_sign(gammas, expected_gammas, msg=f"{msg}: gammas")
    assert_close(lambdas, expected_lambdas, rtol=1e-6, atol=1e-8, msg=f"{msg}: lambdas")
    # ViViT's normalisation: the batch means are the loss's derivatives
    assert_close(lambdas.mean(0), evals, rtol=1e-6, atol=1e-10, msg=f"{msg}: mean λ")


@pytest.mark.parametrize("case", [CASES_BY_NAME[n] for n in CASE_NAMES], ids=str)
def test_full_ggn(case):
    batch_size = max(case.batch_size, 3)  # a rank of at least TOP_K
    reference = dense_reference(case.name, batch_size)
    ext = GGNDirectionalDerivatives(top_k=TOP_K)
    model = run_case(case, ext, batch_size=batch_size)
    params = ext.params(0)
    gammas, lambdas = ext.result(0)
    assert gammas.shape == lambdas.shape == (reference.N, TOP_K)
    assert all(p.ggn_gammas is gammas and p.ggn_lambdas is lambdas for p in params)
    assert {id(p) for p in params} == {id(p) for p in trainable(model).values()}
    check_group(gammas, lambdas, reference, names_of(model, params), ext.eigenvalues(0), case.name)


@pytest.mark.parametrize("case_name", ["mlp_ce", "residual_cnn"])
def test_layer_blocks_and_criterion(case_name):
    case = CASES_BY_NAME[case_name]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    ext = GGNDirectionalDerivatives(
        criterion=lambda evals: [0, 1],  # the two largest: evals come largest first
        param_groups=layer_groups(model),
    )
    run_curvext(model, loss_fn, X, y, ext)
    assert len(ext.param_groups) > 1
    for index, group in enumerate(ext.param_groups):
        gammas, lambdas = ext.result(index)
        assert gammas.shape[1] == 2
        assert all(p.ggn_gammas is gammas for p in group)
        check_group(
            gammas,
            lambdas,
            reference,
            names_of(model, group),
            ext.eigenvalues(index),
            f"group {index}",
        )


def test_chunked_columns():
    """Columns pushed one per backward (the gradient in its own chunk)."""
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    model, loss_fn = extend(model), extend(loss_fn)
    ext = GGNDirectionalDerivatives(top_k=TOP_K)
    loss = loss_fn(model(X), y)
    with backpack(ext, max_columns=1):
        loss.backward()
    gammas, lambdas = ext.result(0)
    check_group(gammas, lambdas, reference, names_of(model, ext.params(0)), ext.eigenvalues(0))


def test_mc_samples():
    """Directions and λ of the MC estimate (``SqrtGGN`` under the same seed)."""
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    torch.manual_seed(3)
    ext = GGNDirectionalDerivatives(top_k=TOP_K, mc_samples=2)
    run_curvext(model, loss_fn, X, y, ext)
    names = names_of(model, ext.params(0))
    model, loss_fn, X, y = case.build()
    torch.manual_seed(3)
    sqrt_params = trainable(run_curvext(model, loss_fn, X, y, SqrtGGN(mc_samples=2)))
    V = torch.cat([sqrt_params[n].sqrt_ggn.flatten(2) for n in names], 2)  # [K, N, P]
    evals, directions = dense_directions(V.flatten(0, 1).T @ V.flatten(0, 1), TOP_K)
    N = reference.N
    grads = torch.cat([reference.per_sample_grads(n).reshape(N, -1) for n in names], 1)
    expected_lambdas = N * (V @ directions).square().sum(0)
    gammas, lambdas = ext.result(0)
    assert_close(ext.eigenvalues(0), evals, rtol=1e-6, atol=1e-10)
    assert_up_to_sign(gammas, N * grads @ directions)
    assert_close(lambdas, expected_lambdas, rtol=1e-6, atol=1e-8)


SUB_GGN, SUB_GRAD = [4, 0, 2], [3, 1]


def subsampled_reference(reference, names, top_k):
    """ViViT's sub-sampling: directions of ``N/|S| Σ_{n∈S} G_n``."""
    N = reference.N
    ggn = N / len(SUB_GGN) * reference.per_sample_ggn(names)[SUB_GGN].sum(0)
    evals, directions = dense_directions(ggn, top_k)
    gammas, lambdas = reference_derivatives(reference, names, directions)
    return evals, directions, gammas[SUB_GRAD], lambdas[SUB_GGN]


def test_subsampling():
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name, batch_size=6)
    model, loss_fn, X, y = case.build(6)
    ext = GGNDirectionalDerivatives(top_k=TOP_K, subsampling_ggn=SUB_GGN, subsampling_grad=SUB_GRAD)
    run_curvext(model, loss_fn, X, y, ext)
    names = names_of(model, ext.params(0))
    evals, _, expected_gammas, expected_lambdas = subsampled_reference(reference, names, TOP_K)
    gammas, lambdas = ext.result(0)
    assert gammas.shape == (len(SUB_GRAD), TOP_K) and lambdas.shape == (len(SUB_GGN), TOP_K)
    assert_close(ext.eigenvalues(0), evals, rtol=1e-6, atol=1e-10)
    assert_up_to_sign(gammas, expected_gammas)
    assert_close(lambdas, expected_lambdas, rtol=1e-6, atol=1e-8)


def dense_newton_step(reference, names, directions, damping):
    """Solve ``(Eᵀ G E + diag δ) c = -Eᵀ ∇L`` densely; ``s = E c``."""
    ggn = reference.ggn(names)
    gradient = torch.cat([reference.gradient(n).flatten() for n in names])
    matrix = directions.T @ ggn @ directions + torch.diag(damping)
    return directions @ torch.linalg.solve(matrix, -directions.T @ gradient)


def stacked_steps(params):
    return torch.cat([p.damped_newton_step.flatten() for p in params])


@pytest.mark.parametrize("case_name", ["mlp_ce", "residual_cnn", "sequence"])
def test_damped_newton_constant(case_name):
    case = CASES_BY_NAME[case_name]
    reference = dense_reference(case.name)
    ext = DampedNewtonStep(damping=0.1, top_k=TOP_K)
    model = run_case(case, ext)
    params = ext.params(0)
    names = names_of(model, params)
    _, directions = dense_directions(reference.ggn(names), TOP_K)
    expected = dense_newton_step(reference, names, directions, torch.full((TOP_K,), 0.1))
    for param, step in zip(params, ext.result(0), strict=True):
        assert step is param.damped_newton_step and step.shape == param.shape
    assert_close(stacked_steps(params), expected, rtol=1e-6, atol=1e-8)


def test_damped_newton_callable_and_groups():
    """A damping callable sees (evals, gammas, lambdas); one step per group."""
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    seen = []

    def damping(evals, gammas, lambdas):
        seen.append((evals.shape, gammas.shape, lambdas.shape))
        return 0.5 * evals + 1e-3

    ext = DampedNewtonStep(damping=damping, top_k=2, param_groups=layer_groups(model))
    run_curvext(model, loss_fn, X, y, ext)
    N = reference.N
    assert seen == [((2,), (N, 2), (N, 2))] * len(ext.param_groups)
    for group in ext.param_groups:
        names = names_of(model, group)
        evals, directions = dense_directions(reference.ggn(names), 2)
        expected = dense_newton_step(reference, names, directions, 0.5 * evals + 1e-3)
        assert_close(stacked_steps(group), expected, rtol=1e-6, atol=1e-8)


def test_damped_newton_subsampled():
    """ViViT's DampedNewton: means of γ and λ over the sub-sampled rows."""
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name, batch_size=6)
    model, loss_fn, X, y = case.build(6)
    ext = DampedNewtonStep(
        damping=0.01, top_k=TOP_K, subsampling_ggn=SUB_GGN, subsampling_grad=SUB_GRAD
    )
    run_curvext(model, loss_fn, X, y, ext)
    names = names_of(model, ext.params(0))
    _, directions, gammas, lambdas = subsampled_reference(reference, names, TOP_K)
    expected = directions @ (-gammas.mean(0) / (lambdas.mean(0) + 0.01))
    assert_close(stacked_steps(ext.params(0)), expected, rtol=1e-6, atol=1e-8)


def test_infinite_damping_drops_directions():
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    ext = DampedNewtonStep(
        damping=lambda evals, g, lam: torch.tensor([math.inf, 0.0, math.inf]), top_k=TOP_K
    )
    model = run_case(case, ext)
    names = names_of(model, ext.params(0))
    _, directions = dense_directions(reference.ggn(names), TOP_K)
    expected = dense_newton_step(reference, names, directions[:, 1:2], torch.zeros(1))
    assert_close(stacked_steps(ext.params(0)), expected, rtol=1e-6, atol=1e-8)


def test_unused_parameter_gets_zero_step():
    case = CASES_BY_NAME["mlp_ce"]
    model, loss_fn, X, y = case.build()
    unused = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    ext = DampedNewtonStep(
        damping=1.0, param_groups=[{"params": list(model.parameters()) + [unused]}]
    )
    run_curvext(model, loss_fn, X, y, ext)
    assert torch.equal(unused.damped_newton_step, torch.zeros(3, dtype=torch.float64))


def test_next_to_other_extensions():
    """Sharing the backward with GGNEigen and BatchGrad changes nothing."""
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    eigen = GGNEigen(top_k=TOP_K)
    ext = GGNDirectionalDerivatives(top_k=TOP_K)
    step = DampedNewtonStep(damping=0.1, top_k=TOP_K)
    model = run_case(case, BatchGrad(), eigen, ext, step)
    names = names_of(model, ext.params(0))
    gammas, lambdas = ext.result(0)
    check_group(gammas, lambdas, reference, names, ext.eigenvalues(0))
    assert_close(eigen.result(0)[0], ext.eigenvalues(0), rtol=1e-12, atol=0)
    for name, param in trainable(model).items():
        assert_close(param.grad_batch, reference.per_sample_grads(name))
    _, directions = dense_directions(reference.ggn(names), TOP_K)
    expected = dense_newton_step(reference, names, directions, torch.full((TOP_K,), 0.1))
    assert_close(stacked_steps(step.params(0)), expected, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damping, error, match",
    [
        (-1.0, ValueError, "finite and >= 0"),
        (math.nan, ValueError, "finite and >= 0"),
        (math.inf, ValueError, "finite and >= 0"),
        (True, TypeError, "number >= 0 or a callable"),
        ("1e-3", TypeError, "number >= 0 or a callable"),
        (None, TypeError, "number >= 0 or a callable"),
    ],
)
def test_invalid_constant_damping(damping, error, match):
    with pytest.raises(error, match=match):
        DampedNewtonStep(damping=damping)


@pytest.mark.parametrize(
    "returned, error, match",
    [
        (lambda evals: torch.ones(len(evals) + 1), ValueError, r"shape \(4,\) for k = 3"),
        (lambda evals: torch.tensor(1.0), ValueError, r"shape \(\) for k = 3"),
        (lambda evals: -torch.ones_like(evals), ValueError, ">= 0"),
        (lambda evals: torch.full_like(evals, math.nan), ValueError, "not NaN"),
        (lambda evals: 1e-3, TypeError, "returned a float"),
    ],
)
def test_invalid_damping_callable(returned, error, match):
    ext = DampedNewtonStep(damping=lambda evals, g, lam: returned(evals), top_k=TOP_K)
    with pytest.raises(error, match=match):
        run_case(CASES_BY_NAME["mlp_ce"], ext)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"subsampling_ggn": []}, ValueError, "selects no sample"),
        ({"subsampling_grad": [0, 0]}, ValueError, "index twice"),
        ({"subsampling_ggn": [-1]}, ValueError, "negative index"),
        ({"subsampling_grad": [0.5]}, TypeError, "sample indices"),
        ({"subsampling_grad": 3}, TypeError, "list of sample indices"),
        ({"subsampling_ggn": torch.ones(2)}, TypeError, "1d list of sample indices"),
        ({"top_k": 0}, ValueError, r"GGNDirectionalDerivatives\(top_k=0\)"),
        ({"mc_samples": -1}, ValueError, r"GGNDirectionalDerivatives\(mc_samples=-1\)"),
        ({"param_groups": []}, ValueError, r"GGNDirectionalDerivatives\(param_groups=\[\]\)"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GGNDirectionalDerivatives(**kwargs)


def test_subsampling_index_out_of_range():
    ext = GGNDirectionalDerivatives(subsampling_grad=[0, 9])
    with pytest.raises(IndexError, match=r"subsampling_grad=\[0, 9\].*N = 4"):
        run_case(CASES_BY_NAME["mlp_ce"], ext, batch_size=4)


def test_top_k_larger_than_subsampled_rank_bound():
    # mlp_ce: 3 classes, exact square root with C - 1 = 2 columns per sample
    ext = GGNDirectionalDerivatives(top_k=5, subsampling_ggn=[0, 1])
    with pytest.raises(ValueError, match=r"at most N·K = 4 \(N = 2 samples in subsampling_ggn"):
        run_case(CASES_BY_NAME["mlp_ce"], ext)


def test_result_before_backward():
    with pytest.raises(RuntimeError, match="GGNDirectionalDerivatives has no result yet"):
        GGNDirectionalDerivatives().result(0)
    with pytest.raises(RuntimeError, match="DampedNewtonStep has no result yet"):
        DampedNewtonStep(damping=1.0).eigenvalues(0)


def test_repr():
    text = repr(DampedNewtonStep(damping=0.5, top_k=2, subsampling_grad=[1]))
    assert text.startswith("DampedNewtonStep(damping=0.5, top_k=2")
    assert "subsampling_grad=[1]" in text and "eigenvectors" not in text
