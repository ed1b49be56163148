"""``CGInverse`` and ``NeumannInverse`` against ``torch.linalg.solve`` on dense matrices."""

import warnings

import pytest
import torch

from curvext.linalg import CGInverse, NeumannInverse, hutchinson_trace
from tests.test_operators import case_kron_random

DIM = 10


def random_spd(dim=DIM, seed=0):
    torch.manual_seed(seed)
    root = torch.randn(dim, dim + 2)
    return root @ root.T / dim + 0.1 * torch.eye(dim)


def ill_conditioned_spd():
    """Eigenvalues from 1e-2 to 1e2 with a strong diagonal: Jacobi helps CG."""
    torch.manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM))
    dense = basis @ torch.diag(torch.logspace(-2, 2, DIM)) @ basis.T
    scaling = torch.diag(torch.logspace(0, 3, DIM))
    return scaling @ dense @ scaling


@pytest.mark.parametrize("shape", [(DIM,), (DIM, 1), (DIM, 4)])
def test_cg_matches_solve(shape):
    A = random_spd()
    rhs = torch.randn(shape)
    solution = CGInverse(A, tol=1e-10) @ rhs
    assert solution.shape == rhs.shape
    assert torch.allclose(solution, torch.linalg.solve(A, rhs), atol=1e-8)


def test_cg_on_a_kron_operator_with_damping():
    op, dense = case_kron_random()
    damped = op + 0.05
    rhs = torch.randn(dense.shape[0], 3)
    solution = CGInverse(damped, tol=1e-12) @ rhs
    reference = torch.linalg.solve(dense + 0.05 * torch.eye(dense.shape[0]), rhs)
    assert torch.allclose(solution, reference, atol=1e-8)


@pytest.mark.parametrize("as_operator", [False, True], ids=["tensor", "kron-inverse"])
def test_cg_with_preconditioner(as_operator):
    if as_operator:
        op, dense = case_kron_random()
        # KFAC-like: the preconditioner inverts a close approximation of A
        A = dense + 0.1 * torch.diag(torch.rand(dense.shape[0]))
        preconditioner = op.inverse(damping=0.1, use_exact_damping=True)
    else:
        A = ill_conditioned_spd()
        preconditioner = torch.diag(1 / A.diagonal())
    rhs = torch.randn(A.shape[0], 5)
    plain = CGInverse(A, tol=1e-10)
    preconditioned = CGInverse(A, tol=1e-10, preconditioner=preconditioner)
    reference = torch.linalg.solve(A, rhs)
    scale = reference.abs().max()
    assert torch.allclose(plain @ rhs, reference, atol=1e-7 * scale)
    assert torch.allclose(preconditioned @ rhs, reference, atol=1e-7 * scale)
    assert preconditioned.info.iterations < plain.info.iterations


def test_cg_info():
    A = random_spd()
    rhs = torch.randn(DIM, 3)
    rhs[:, 1] = 0.0  # converged before the first iteration
    A_inv = CGInverse(A, tol=1e-9)
    assert A_inv.info is None
    solution = A_inv @ rhs
    info = A_inv.info
    assert 0 < info.iterations <= DIM + 5
    assert info.converged.tolist() == [True, True, True]
    assert torch.equal(info.rhs_norms, rhs.norm(dim=0))
    assert (info.residual_norms <= 1e-9 * info.rhs_norms).all()
    assert len(info.history) == info.iterations + 1
    assert torch.allclose(info.history[0], rhs.norm(dim=0))
    true_residuals = (rhs - A @ solution).norm(dim=0)
    assert torch.allclose(true_residuals, info.residual_norms, atol=1e-10)
    assert (solution[:, 1] == 0).all()


def test_cg_not_converged_warns_and_reports():
    A = ill_conditioned_spd()
    A_inv = CGInverse(A, tol=1e-12, max_iter=2)
    with pytest.warns(RuntimeWarning, match=r"did not converge to tol=1e-12 in max_iter=2"):
        A_inv @ torch.randn(DIM, 2)
    assert A_inv.info.iterations == 2
    assert not A_inv.info.converged.any()


def test_cg_refuses_indefinite():
    torch.manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM))
    A = basis @ torch.diag(torch.linspace(-1.0, 2.0, DIM)) @ basis.T
    with pytest.raises(ValueError, match=r"A is not positive definite: p\^T A p = .* <= 0"):
        CGInverse(A, max_iter=1000) @ torch.randn(DIM, 3)


def test_cg_refuses_negative_definite_at_once():
    with pytest.raises(ValueError, match=r"right-hand side 0 at iteration 0"):
        CGInverse(-torch.eye(3)) @ torch.ones(3)


def test_cg_refuses_indefinite_preconditioner():
    with pytest.raises(ValueError, match="the preconditioner is not positive definite"):
        CGInverse(torch.eye(3), preconditioner=-torch.eye(3)) @ torch.ones(3)


def test_inverse_is_an_operator():
    """Tr(A^{-1}) by Hutchinson on CGInverse and NeumannInverse."""
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    exact = 1.75
    cg = hutchinson_trace(CGInverse(A, tol=1e-12), 3)
    neumann = hutchinson_trace(NeumannInverse(A, scale=0.4, num_terms=300), 3)
    assert torch.allclose(cg, torch.tensor(exact))
    assert torch.allclose(neumann, torch.tensor(exact))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"tol": 0.0},
            ValueError,
            "CGInverse: tol must be a finite number > 0, got 0.0",
        ),
        ({"tol": float("nan")}, ValueError, "tol must be a finite number > 0"),
        (
            {"max_iter": 0},
            ValueError,
            "CGInverse: max_iter must be an integer >= 1, got 0",
        ),
        (
            {"preconditioner": torch.eye(4)},
            ValueError,
            r"the preconditioner has shape \(4, 4\), A has \(3, 3\)",
        ),
    ],
)
def test_cg_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        CGInverse(torch.eye(3), **kwargs)


def test_inverse_operand_errors():
    with pytest.raises(ValueError, match=r"CGInverse: A must be a square \[P, P\] operator"):
        CGInverse(torch.zeros(2, 3))
    with pytest.raises(
        ValueError,
        match=r"CGInverse @ x: expected x of shape \[3\] or \[3, M\], got \[4\]",
    ):
        CGInverse(torch.eye(3)) @ torch.ones(4)
    with pytest.raises(
        ValueError,
        match=r"NeumannInverse @ x: expected x of shape \[3\] or \[3, M\], got \[3, 2, 1\]",
    ):
        NeumannInverse(torch.eye(3), scale=0.5) @ torch.ones(3, 2, 1)


@pytest.mark.parametrize("shape", [(DIM,), (DIM, 3)])
def test_neumann_matches_solve(shape):
    A = random_spd()
    scale = 1 / torch.linalg.eigvalsh(A).max().item()
    rhs = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A_inv = NeumannInverse(A, scale=scale, num_terms=2000)
    assert A_inv.spectral_radius_estimate < 1
    solution = A_inv @ rhs
    assert solution.shape == rhs.shape
    assert torch.allclose(solution, torch.linalg.solve(A, rhs), atol=1e-6)


def test_neumann_truncation_is_the_partial_sum():
    A = random_spd()
    rhs = torch.randn(DIM, 2)
    iteration = torch.eye(DIM) - 0.3 * A
    partial = 0.3 * sum(torch.linalg.matrix_power(iteration, k) for k in range(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A_inv = NeumannInverse(A, scale=0.3, num_terms=5)
    assert torch.allclose(A_inv @ rhs, partial @ rhs)


@pytest.mark.parametrize(
    "make_A, scale",
    [
        (random_spd, None),  # scale far above 2 / lambda_max
        (lambda: torch.diag(torch.tensor([1.0, -0.5, 2.0])), 0.1),  # indefinite
    ],
    ids=["scale-too-large", "indefinite"],
)
def test_neumann_warns_when_diverging(make_A, scale):
    A = make_A()
    if scale is None:
        scale = 3 / torch.linalg.eigvalsh(A).max().item()
    with pytest.warns(UserWarning, match=r"NeumannInverse: the series does not converge: .* >= 1"):
        A_inv = NeumannInverse(A, scale=scale, num_terms=10)
    assert A_inv.spectral_radius_estimate >= 1


def test_neumann_check_can_be_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A_inv = NeumannInverse(-torch.eye(3), scale=1.0, num_terms=3, power_iterations=0)
    assert A_inv.spectral_radius_estimate is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": 0.0}, "NeumannInverse: scale must be a finite number > 0, got 0.0"),
        ({"num_terms": 0}, "NeumannInverse: num_terms must be an integer >= 1, got 0"),
        ({"power_iterations": -1}, "power_iterations must be an integer >= 0, got -1"),
    ],
)
def test_neumann_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeumannInverse(torch.eye(3), **kwargs)
