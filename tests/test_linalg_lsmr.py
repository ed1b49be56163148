"""``LSMRInverse`` against ``torch.linalg.solve`` and the pseudo-inverse (float64).

Invertible systems are compared with ``torch.linalg.solve``; singular ones
with the minimum-norm least-squares solution ``torch.linalg.pinv(A) @ b``
(``torch.linalg.lstsq`` with the ``gelsd`` driver gives the same), which is
what LSMR started at ``x = 0`` converges to; ``damp`` with the normal
equations ``(AᵀA + damp² I)⁻¹ Aᵀ b``. Operators: dense matrices, a
``KronOperator`` whose dense reference is ``torch.kron`` of its factors, and a
data-set ``GGNOperator`` (singular: cross-entropy) whose reference is built
with ``torch.func``.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvext.linalg import CGInverse, LSMRInverse
from curvext.operators import GGNOperator
from tests.test_operators import case_kron_random

pytest.importorskip("scipy")  # LSMR runs SciPy's lsmr (the operators extra)

DIM = 8
TIGHT = dict(atol=1e-12, btol=1e-12)


def random_spd(dim=DIM, seed=0):
    torch.manual_seed(seed)
    root = torch.randn(dim, dim + 2)
    return root @ root.T / dim + 0.1 * torch.eye(dim)


def singular_psd(rank=5, dim=DIM):
    """``Q diag(λ) Qᵀ`` with ``dim - rank`` zero eigenvalues."""
    torch.manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim))
    eigenvalues = torch.cat([torch.linspace(0.5, 3.0, rank), torch.zeros(dim - rank)])
    return basis @ torch.diag(eigenvalues) @ basis.T


@pytest.mark.parametrize("shape", [(DIM,), (DIM, 1), (DIM, 4)])
def test_spd_matches_solve(shape):
    A = random_spd()
    rhs = torch.randn(shape)
    inverse = LSMRInverse(A, **TIGHT)
    solution = inverse @ rhs
    assert solution.shape == rhs.shape and solution.dtype == A.dtype
    torch.testing.assert_close(solution, torch.linalg.solve(A, rhs), rtol=1e-8, atol=1e-9)
    assert bool(inverse.info.converged.all())
    residuals = rhs.reshape(DIM, -1) - A @ solution.reshape(DIM, -1)
    torch.testing.assert_close(
        inverse.info.residual_norms, residuals.norm(dim=0), rtol=1e-3, atol=1e-9
    )
    torch.testing.assert_close(inverse.info.rhs_norms, rhs.reshape(DIM, -1).norm(dim=0))


def test_nonsymmetric_and_transpose():
    """LSMR needs products with Aᵀ: a non-symmetric A checks that they are right."""
    torch.manual_seed(1)
    A = torch.randn(DIM, DIM) + 4 * torch.eye(DIM)
    rhs = torch.randn(DIM, 3)
    inverse = LSMRInverse(A, **TIGHT)
    torch.testing.assert_close(inverse @ rhs, torch.linalg.solve(A, rhs), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(inverse.T @ rhs, torch.linalg.solve(A.T, rhs), rtol=1e-8, atol=1e-9)


def test_singular_gives_minimum_norm_least_squares():
    A = singular_psd()
    rhs = torch.randn(DIM, 3)  # not in the range of A: an inconsistent system
    solution = LSMRInverse(A, **TIGHT) @ rhs
    reference = torch.linalg.pinv(A) @ rhs
    lstsq = torch.linalg.lstsq(A, rhs, rcond=1e-10, driver="gelsd").solution
    torch.testing.assert_close(lstsq, reference, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(solution, reference, rtol=1e-8, atol=1e-9)


def test_damp_solves_the_regularised_problem():
    torch.manual_seed(2)
    A = torch.randn(DIM, DIM)
    rhs, damp = torch.randn(DIM, 2), 0.7
    solution = LSMRInverse(A, damp=damp, **TIGHT) @ rhs
    reference = torch.linalg.solve(A.T @ A + damp**2 * torch.eye(DIM), A.T @ rhs)
    torch.testing.assert_close(solution, reference, rtol=1e-8, atol=1e-9)


def test_on_a_kron_operator():
    op, dense = case_kron_random()
    rhs = torch.randn(dense.shape[0], 3)
    solution = LSMRInverse(op, maxiter=200, **TIGHT) @ rhs
    torch.testing.assert_close(solution, torch.linalg.solve(dense, rhs), rtol=1e-7, atol=1e-8)
    damped = LSMRInverse(op + 0.05, **TIGHT) @ rhs[:, 0]
    torch.testing.assert_close(
        damped,
        torch.linalg.solve(dense + 0.05 * torch.eye(dense.shape[0]), rhs[:, 0]),
        rtol=1e-7,
        atol=1e-8,
    )


def test_on_a_singular_ggn_operator():
    """Cross-entropy's GGN of ``Linear(3, 3)`` has rank ≤ (C - 1)(D + 1) = 8 < P = 12."""
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 3), nn.CrossEntropyLoss()
    X, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    G = GGNOperator(model, loss_fn, list(model.parameters()), data)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def output_of(theta):
        blocks = theta.split([p.numel() for p in params])
        return functional_call(
            model, {n: b.view_as(p) for n, b, p in zip(names, blocks, params)}, (X,)
        )

    flat = torch.cat([p.flatten() for p in params])
    jacobian = jacrev(output_of)(flat).flatten(0, -2)
    output = output_of(flat).detach()
    loss_hessian = hessian(lambda out: loss_fn(out, y))(output).reshape(30, 30)
    dense = jacobian.T @ loss_hessian @ jacobian
    assert torch.linalg.matrix_rank(dense).item() == 8
    rhs = torch.randn(12, 2)
    solution = LSMRInverse(G, maxiter=100, **TIGHT) @ rhs
    torch.testing.assert_close(solution, torch.linalg.pinv(dense) @ rhs, rtol=1e-6, atol=1e-7)


def test_float32_operator_keeps_its_dtype():
    A = random_spd().float()
    rhs = torch.randn(DIM, 2, dtype=torch.float64)
    solution = LSMRInverse(A) @ rhs
    assert solution.dtype == torch.float32 and solution.device == A.device
    reference = torch.linalg.solve(A.double(), rhs)
    torch.testing.assert_close(solution.double(), reference, rtol=1e-4, atol=1e-4)


def test_maxiter_warns_and_reports():
    A = torch.diag(torch.logspace(-3, 3, DIM))
    inverse = LSMRInverse(A, maxiter=2, **TIGHT)
    stopped = "2 of 2 right-hand sides stopped.*maxiter was reached"
    with pytest.warns(RuntimeWarning, match=stopped):
        inverse @ torch.ones(DIM, 2)
    assert inverse.info.iterations.tolist() == [2, 2]
    assert inverse.info.stop_reasons.tolist() == [7, 7]
    assert not inverse.info.converged.any()


def test_refusals():
    A = random_spd()
    square = r"LSMRInverse: A must be a square \[P, P\] operator, got shape \(3, 4\)"
    with pytest.raises(ValueError, match=square):
        LSMRInverse(torch.zeros(3, 4))
    shape = rf"LSMRInverse @ x: expected x of shape \[{DIM}\] or \[{DIM}, M\], got \[3\]"
    with pytest.raises(ValueError, match=shape):
        LSMRInverse(A) @ torch.ones(3)
    negative = r"LSMRInverse: atol must be a finite number >= 0, got -1.0"
    with pytest.raises(ValueError, match=negative):
        LSMRInverse(A, atol=-1.0)
    with pytest.raises(ValueError, match="LSMRInverse: damp must be a finite number >= 0"):
        LSMRInverse(A, damp=float("nan"))
    with pytest.raises(ValueError, match="LSMRInverse: maxiter must be an integer >= 1"):
        LSMRInverse(A, maxiter=0)
    no_transpose = r"LSMR multiplies by A and A\^T, but CGInverse has no .T"
    with pytest.raises(TypeError, match=no_transpose):
        LSMRInverse(CGInverse(A))
    with pytest.raises(TypeError, match="A must be a square linear operator"):
        LSMRInverse([[1.0]])
