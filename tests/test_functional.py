"""curvext.functional (dattri's function-level API) against dense torch.func references."""

import pytest
import torch
from torch.func import hessian

from curvext.functional import (
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)

DIM_IN, DIM_HIDDEN, NUM_SAMPLES = 3, 2, 16
NUM_PARAMS = DIM_IN * DIM_HIDDEN + DIM_HIDDEN + DIM_HIDDEN + 1  # 11


def mlp_loss(theta, inputs, targets):
    """Mean squared error of a tanh MLP whose weights are the flat vector ``theta``."""
    cut = DIM_IN * DIM_HIDDEN
    w1 = theta[:cut].reshape(DIM_HIDDEN, DIM_IN)
    b1 = theta[cut : cut + DIM_HIDDEN]
    w2 = theta[cut + DIM_HIDDEN : cut + 2 * DIM_HIDDEN]
    b2 = theta[-1]
    outputs = torch.tanh(inputs @ w1.T + b1) @ w2 + b2
    return 0.5 * ((outputs - targets) ** 2).mean()


def spd_matrix(dim, low=1.0, high=3.0):
    """A symmetric matrix with eigenvalues spread over ``[low, high]``."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim))
    return q @ torch.diag(torch.linspace(low, high, dim)) @ q.T


def quadratic_case():
    A = spd_matrix(5)
    b = torch.randn(5)

    def func(w, shift):
        return 0.5 * w @ A @ w - b @ w + (shift * w).sum() ** 2

    x = (torch.randn(5), torch.randn(5))
    return func, x


def mlp_case():
    theta = 0.5 * torch.randn(NUM_PARAMS)
    x = (theta, torch.randn(NUM_SAMPLES, DIM_IN), torch.randn(NUM_SAMPLES))
    return mlp_loss, x


CASES = {"quadratic": quadratic_case, "mlp": mlp_case}


def dense(func, x, argnums=0):
    return hessian(func, argnums=argnums)(*x)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_matches_dense_hessian(case, mode):
    func, x = CASES[case]()
    H = dense(func, x)
    v = torch.randn(H.shape[0])
    expected = H @ v + 0.3 * v
    assert torch.allclose(hvp(func, mode=mode, regularization=0.3)(x, v), expected)
    assert torch.allclose(hvp_at_x(func, x, mode=mode, regularization=0.3)(v), expected)


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_other_argnums_and_vmap(mode):
    func, x = quadratic_case()
    H = dense(func, x, argnums=1)
    vectors = torch.randn(4, 5)
    batched = torch.vmap(hvp_at_x(func, x, argnums=1, mode=mode))(vectors)
    assert torch.allclose(batched, vectors @ H)


@pytest.mark.parametrize("case", CASES)
def test_ihvp_explicit_and_cg_exact(case):
    func, x = CASES[case]()
    regularization = 0.5 if case == "quadratic" else 1.0  # the MLP Hessian may be indefinite
    H = dense(func, x) + regularization * torch.eye(x[0].shape[0])
    vectors = torch.randn(3, H.shape[0])
    expected = torch.linalg.solve(H, vectors.T).T
    dim = H.shape[0]
    if torch.linalg.eigvalsh(H).min() > 0:
        for result in (
            ihvp_cg(func, max_iter=dim, tol=1e-12, regularization=regularization)(x, vectors),
            ihvp_at_x_cg(
                func, *x, max_iter=dim, tol=1e-12, mode="rev-fwd", regularization=regularization
            )(vectors[0]),
        ):
            assert torch.allclose(
                result,
                expected[: result.reshape(-1, dim).shape[0]].reshape(result.shape),
                atol=1e-8,
            )
    assert torch.allclose(ihvp_explicit(func, regularization=regularization)(x, vectors), expected)
    single = ihvp_at_x_explicit(func, *x, regularization=regularization)(vectors[1])
    assert single.shape == (dim,) and torch.allclose(single, expected[1])


def test_ihvp_cg_mlp_positive_definite():
    """With enough damping the MLP Hessian is positive definite, so CG must match the solve."""
    func, x = mlp_case()
    H = dense(func, x)
    damping = 0.1 - torch.linalg.eigvalsh(H).min().item()
    v = torch.randn(2, NUM_PARAMS)
    expected = torch.linalg.solve(H + damping * torch.eye(NUM_PARAMS), v.T).T
    result = ihvp_cg(func, max_iter=4 * NUM_PARAMS, tol=1e-12, regularization=damping)(x, v)
    assert torch.allclose(result, expected, atol=1e-8)


def test_ihvp_cg_rejects_indefinite_hessian():
    def func(w):
        return w[0] ** 2 - w[1] ** 2

    with pytest.raises(ValueError, match="not positive definite"):
        ihvp_at_x_cg(func, torch.zeros(2), max_iter=2)(torch.ones(2))


@pytest.mark.parametrize("norm_constant", [1.0, 10.0])
def test_ihvp_arnoldi_exact_with_full_krylov_space(norm_constant):
    func, x = quadratic_case()
    H = dense(func, x) + 0.2 * torch.eye(5)
    v = torch.randn(3, 5)
    expected = torch.linalg.solve(H, v.T).T
    result = ihvp_arnoldi(
        func, max_iter=6, top_k=5, norm_constant=norm_constant, regularization=0.2
    )(x, v)
    assert torch.allclose(result, expected, atol=1e-8)


def test_ihvp_arnoldi_top_k_keeps_largest_eigenpairs():
    func, x = quadratic_case()
    H = dense(func, x)
    ihvp = ihvp_at_x_arnoldi(func, *x, max_iter=6, top_k=2, mode="rev-rev")
    eigenvalues, eigenvectors = torch.linalg.eigh(H)
    assert torch.allclose(ihvp.eigenvalues.sort().values, eigenvalues[-2:])
    v = eigenvectors[:, -1] + eigenvectors[:, 0]
    # the smallest eigendirection is dropped: only the top one is inverted
    assert torch.allclose(ihvp(v), eigenvectors[:, -1] / eigenvalues[-1], atol=1e-8)


def regression_case():
    """Least squares with a well-conditioned Hessian: eigenvalues in [1, 3] (plus 0.1 ridge)."""
    features = torch.randn(64, 4)
    # whiten the sample, then colour it: the empirical second moment is exactly spd_matrix(4)
    features = features @ torch.linalg.inv(torch.linalg.cholesky(features.T @ features / 64)).T
    features = features @ torch.linalg.cholesky(spd_matrix(4)).T
    targets = torch.randn(64)

    def func(w, a, y):
        return 0.5 * ((a @ w - y) ** 2).mean() + 0.05 * (w**2).sum()

    return func, (torch.randn(4), features, targets)


def test_ihvp_lissa_full_batch_is_the_neumann_series():
    """Full batches make LiSSA deterministic: the error contracts by rho = max|1 - lambda/s|
    per step."""
    func, x = regression_case()
    H = dense(func, x)
    eigenvalues = torch.linalg.eigvalsh(H)
    scaling = eigenvalues.max().item()
    rho = (1 - eigenvalues / scaling).abs().max().item()
    depth = 200
    v = torch.randn(2, 4)
    expected = torch.linalg.solve(H, v.T).T
    result = ihvp_lissa(func, batch_size=64, recursion_depth=depth, scaling=scaling)(x, v)
    bound = rho ** (depth + 1) * expected.norm(dim=1).max() * 10
    assert (result - expected).norm(dim=1).max() <= max(bound, 1e-10)


def test_ihvp_lissa_stochastic_converges():
    """Mini-batches of 32 of 64 samples. The recursion is unbiased (H_t is drawn
    independently of u_t, so E[u_t] follows the full-batch recursion, whose bias
    rho^31 ~ 0.65^31 ~ 1e-6 is negligible); what is left is the batch noise, which
    shrinks as 1/sqrt(num_repeat). Over seeds 0-9 this setting gives relative errors
    0.02-0.08, so 0.15 leaves a margin while still failing a wrong fixed point
    (e.g. a missing 1/s or damping term is off by O(1))."""
    func, x = regression_case()
    H = dense(func, x)
    v = torch.randn(4)
    expected = torch.linalg.solve(H, v)
    ihvp = ihvp_at_x_lissa(
        func,
        *x,
        batch_size=32,
        num_repeat=10,
        recursion_depth=30,
        scaling=torch.linalg.eigvalsh(H).max().item(),
        mode="rev-fwd",
    )
    result = ihvp(v)
    assert (result - expected).norm() / expected.norm() < 0.15


def test_ihvp_lissa_damping_fixed_point():
    func, x = regression_case()
    H = dense(func, x)
    v = torch.randn(4)
    scaling, damping = 5.0, 0.1
    expected = torch.linalg.solve(H + scaling * damping * torch.eye(4), v)
    result = ihvp_lissa(func, batch_size=64, recursion_depth=300, damping=damping, scaling=scaling)(
        x, v
    )
    assert torch.allclose(result, expected, atol=1e-8)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: hvp(lambda w: w.sum(), mode="fwd-fwd"),
        lambda: hvp_at_x(lambda w: w.sum(), (torch.ones(2),), mode="fwd-rev"),
        lambda: ihvp_cg(lambda w: w.sum(), mode="rev"),
        lambda: ihvp_arnoldi(lambda w: w.sum(), mode="fwd"),
        lambda: ihvp_lissa(lambda w: w.sum(), mode="fwd"),
    ],
)
def test_bad_mode(factory):
    with pytest.raises(ValueError, match="mode must be 'rev-rev' or 'rev-fwd'"):
        factory()


def test_non_square_use():
    matrix_arg = torch.ones(2, 3)

    def func(w):
        return (w**2).sum()

    with pytest.raises(ValueError, match=r"square \[D, D\].*got shape \[2, 3\]"):
        ihvp_at_x_explicit(func, matrix_arg)
    with pytest.raises(ValueError, match=r"square \[D, D\].*got shape \[2, 3\]"):
        ihvp_at_x_cg(func, matrix_arg)
    with pytest.raises(ValueError, match=r"square \[D, D\]"):
        ihvp_at_x_arnoldi(func, matrix_arg)
    with pytest.raises(ValueError, match=r"expected v of shape \[3\] or \[M, 3\], got \[3, 2\]"):
        ihvp_at_x_cg(func, torch.ones(3))(torch.ones(3, 2))
    with pytest.raises(TypeError, match="argnums must be a single int"):
        ihvp_at_x_explicit(func, torch.ones(3), argnums=(0,))


def test_lissa_bad_input():
    func, x = regression_case()
    with pytest.raises(ValueError, match="batch_size=65 exceeds the 64 samples"):
        ihvp_lissa(func, batch_size=65)(x, torch.ones(4))
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        ihvp_lissa(func)((x[0], x[1], x[2][:10]), torch.ones(4))
    with pytest.raises(ValueError, match="diverged"):
        ihvp_lissa(func, batch_size=64, recursion_depth=300, scaling=0.1)(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"damping must lie in \[0, 1\)"):
        ihvp_lissa(func, damping=1.5)
