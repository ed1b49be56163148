"""Lanczos spectral densities, top eigenpairs and Submatrix against dense float64 matrices."""

import pytest
import torch

from curvext.linalg import (
    LanczosSpectrum,
    lanczos_log_spectrum,
    lanczos_spectrum,
    top_eigenpairs,
)
from curvext.linalg.eigen import lanczos, tridiagonal_eigh
from curvext.operators import DiagonalOperator, Submatrix

DTYPE = torch.float64


def symmetric_with_eigenvalues(eigenvalues, seed=0):
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    generator = torch.Generator().manual_seed(seed)
    dim = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    return Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=DTYPE)) @ Q.T


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- the Lanczos core ---------------------------------------------------------


def test_lanczos_quadrature_is_exact_for_low_degree_moments():
    """Gauss quadrature with m nodes: sum_i w_i theta_i^k = q^T A^k q for k <= 2m - 1."""
    A = symmetric_with_eigenvalues(torch.linspace(-1.0, 2.0, 40, dtype=DTYPE))
    start = torch.randn(40, 2, generator=generator(1), dtype=DTYPE)
    num_steps = 6
    alphas, betas, basis = lanczos(A, start, num_steps)
    nodes, vectors = tridiagonal_eigh(alphas, betas)
    weights = vectors[:, 0, :] ** 2
    q = start / start.norm(dim=0)
    power = q.clone()
    for degree in range(2 * num_steps):
        exact = (q * power).sum(0)
        assert torch.allclose((weights * nodes**degree).sum(1), exact, atol=1e-10)
        power = A @ power
    # Full reorthogonalisation: the basis stays orthonormal.
    gram = basis.transpose(1, 2) @ basis
    assert torch.allclose(gram, torch.eye(num_steps, dtype=DTYPE).expand_as(gram), atol=1e-12)


def test_lanczos_restarts_on_an_invariant_subspace():
    """Three distinct eigenvalues: steps past the third decouple with zero weight."""
    A = symmetric_with_eigenvalues([1.0] * 5 + [2.0] * 5 + [4.0] * 5)
    alphas, betas, basis = lanczos(A, torch.randn(15, generator=generator(), dtype=DTYPE), 8)
    assert betas[0, 2].item() == 0.0
    nodes, vectors = tridiagonal_eigh(alphas, betas)
    weights = vectors[0, 0, :] ** 2
    carried = nodes[0][weights > 1e-12]
    assert torch.allclose(carried, torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE), atol=1e-8)
    gram = basis[0].T @ basis[0]
    assert torch.allclose(gram, torch.eye(8, dtype=DTYPE), atol=1e-10)


# ---- spectral densities -------------------------------------------------------


def test_density_mass_and_peaks_sit_at_the_dense_eigenvalues():
    """With ncv = P the nodes are the eigenvalues: mass ~1 and each cluster's mass ~ its share.

    The tails lost beyond the grid: the outermost eigenvalues lie
    ``margin / (1 + 2 margin)`` = 0.045 (normalised) from its ends, i.e. 2.7
    Gaussian widths (sigma = 2 / 39 / sqrt(8 ln 3) = 0.017): < 0.4 % of their
    weight. The cluster shares are random, a fraction of ||q||^2 in a
    30-of-40-dimensional subspace (Beta(15, 5), std 0.094), averaged over 32
    runs: std 0.017, so 0.06 is 3.5 standard deviations.
    """
    eigenvalues = torch.cat(
        [torch.linspace(0.0, 1.0, 30, dtype=DTYPE), torch.linspace(10.0, 11.0, 10, dtype=DTYPE)]
    )
    A = symmetric_with_eigenvalues(eigenvalues)
    grid, density = lanczos_spectrum(A, ncv=40, num_repeats=32, generator=generator())
    assert grid.shape == density.shape == (1024,)
    assert (density >= 0).all()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=5e-3)
    low_cluster = grid < 5.0
    share = torch.trapezoid(density[low_cluster], grid[low_cluster]).item()
    assert share == pytest.approx(0.75, abs=0.06)
    # Mean: E[q^T A q] = Tr(A) / P, same standard-error argument.
    mean = torch.trapezoid(grid * density, grid).item()
    assert mean == pytest.approx(eigenvalues.mean().item(), abs=0.06 * 10)
    # The grid spans the spectrum plus 5 % margins on each side.
    assert grid[0].item() == pytest.approx(-0.55, abs=1e-8)
    assert grid[-1].item() == pytest.approx(11.55, abs=1e-8)
    # No mass in the gap between the clusters.
    gap = (grid > 3.0) & (grid < 8.0)
    assert density[gap].max().item() < 1e-6


def test_density_matches_the_dense_eigenvalue_density_on_average():
    """The expected density is phi_sigma(t) = 1/P sum_i N(t; lambda_i, sigma^2) for ncv = P.

    The average over 200 runs of the Beta(1/2, (P-1)/2)-distributed weights
    (std sqrt(2/P^2) each) has a per-point relative error of about 10 %, so
    the maximum absolute error is checked against 25 % of the peak.
    """
    eigenvalues = torch.linspace(-2.0, 3.0, 12, dtype=DTYPE)
    A = symmetric_with_eigenvalues(eigenvalues)
    boundaries = (-2.0, 3.0)
    grid, density = lanczos_spectrum(
        A, ncv=12, num_repeats=200, boundaries=boundaries, kappa=3.0, generator=generator()
    )
    half_width = (grid[-1] - grid[0]).item() / 2
    sigma = 2 / 11 / (8 * torch.log(torch.tensor(3.0))).sqrt().item() * half_width
    expected = (
        torch.exp(-0.5 * ((grid[None] - eigenvalues[:, None]) / sigma) ** 2)
        / (sigma * (2 * torch.pi) ** 0.5)
    ).mean(0)
    assert (density - expected).abs().max().item() < 0.25 * expected.max().item()


def test_cached_spectrum_reuses_runs():
    A = symmetric_with_eigenvalues(torch.linspace(1.0, 5.0, 30, dtype=DTYPE))
    calls = []

    class Counting:
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, X):
            calls.append(X.shape[1])
            return A @ X

    spectrum = LanczosSpectrum(Counting(), ncv=10, num_repeats=3, generator=generator())
    assert calls == [3] * 10  # one product with all runs per step
    grid_a, density_a = spectrum.density(num_points=64, kappa=2.0)
    grid_b, density_b = spectrum.density(num_points=128, kappa=5.0, margin=0.1)
    assert len(calls) == 10
    assert grid_a.shape == (64,) and grid_b.shape == (128,)
    assert not torch.allclose(density_a.max(), density_b.max())
    # The one-call function with the same generator gives the same density.
    grid, density = lanczos_spectrum(
        A, ncv=10, num_repeats=3, num_points=64, kappa=2.0, generator=generator()
    )
    assert torch.allclose(grid, grid_a) and torch.allclose(density, density_a)


def test_log_density_mass_and_location():
    """Eigenvalues at 1e-3, 1 and 1e3 (and negatives, which count by |lambda|)."""
    eigenvalues = [1e-3] * 10 + [1.0] * 10 + [-1e3] * 10
    A = symmetric_with_eigenvalues(eigenvalues)
    grid, density = lanczos_log_spectrum(
        A, ncv=30, num_repeats=16, kappa=3.0, generator=generator()
    )
    assert (grid[1:] > grid[:-1]).all()
    log_step = grid.log().diff()
    assert torch.allclose(log_step, log_step[0].expand_as(log_step))
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=5e-3)
    for center in (1e-3 + 1e-5, 1.0 + 1e-5, 1e3 + 1e-5):
        near = (grid > center / 3) & (grid < center * 3)
        share = torch.trapezoid(density[near], grid[near]).item()
        # Thirds of ||q||^2 in 10-of-30-dim subspaces (std 0.085), 16 runs: std 0.021.
        assert share == pytest.approx(1 / 3, abs=0.08)


def test_spectrum_on_a_curvext_operator():
    param = torch.nn.Parameter(torch.zeros(20, dtype=DTYPE))
    param.ggn_diag = torch.linspace(0.5, 2.0, 20, dtype=DTYPE)
    D = DiagonalOperator.from_params([param])
    grid, density = lanczos_spectrum(D, ncv=20, num_repeats=4, generator=generator())
    assert grid[0].item() == pytest.approx(0.5 - 0.075) and grid[-1].item() == pytest.approx(2.075)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ncv": 1}, "ncv must be an integer >= 2"),
        ({"ncv": 11}, "ncv must be at most the dimension 10"),
        ({"ncv": 5, "num_repeats": 0}, "num_repeats must be an integer >= 1"),
        ({"ncv": 5, "kappa": 1.0}, "kappa must be > 1"),
        ({"ncv": 5, "margin": -0.1}, "margin must be a finite number >= 0"),
        ({"ncv": 5, "boundaries": (2.0, 1.0)}, "low < high"),
        ({"ncv": 5, "boundaries": (1.0,)}, "pair"),
        ({"ncv": 5, "num_points": 1}, "num_points must be an integer >= 2"),
    ],
)
def test_spectrum_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos_spectrum(torch.eye(10, dtype=DTYPE), **kwargs)


def test_spectrum_errors_on_shape_and_log_arguments():
    with pytest.raises(ValueError, match=r"square \[P, P\] operator, got shape \(3, 4\)"):
        lanczos_spectrum(torch.zeros(3, 4), ncv=2)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        lanczos_log_spectrum(torch.eye(4, dtype=DTYPE), ncv=2, epsilon=0.0)
    with pytest.raises(ValueError, match=r"boundaries bound \|λ\| and must be >= 0"):
        lanczos_log_spectrum(torch.eye(4, dtype=DTYPE), ncv=2, boundaries=(-1.0, None))


def test_spectrum_of_a_multiple_of_the_identity():
    grid, density = lanczos_spectrum(3.0 * torch.eye(6, dtype=DTYPE), ncv=4)
    assert grid[density.argmax()].item() == pytest.approx(3.0, abs=grid.diff()[0].item())
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)


# ---- top eigenpairs -----------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
@pytest.mark.parametrize("largest", [True, False])
def test_top_eigenpairs_match_eigh(method, largest):
    eigenvalues = torch.cat(
        [
            torch.linspace(-3.0, 1.0, 45, dtype=DTYPE),
            torch.tensor([4.0, 6.0, 9.0, 13.0, 20.0], dtype=DTYPE),
        ]
    )
    A = symmetric_with_eigenvalues(eigenvalues, seed=3)
    k = 3
    values, vectors = top_eigenpairs(A, k, method=method, largest=largest, generator=generator())
    dense_values, dense_vectors = torch.linalg.eigh(A)
    order = torch.arange(50 - 1, 50 - 1 - k, -1) if largest else torch.arange(k)
    assert torch.allclose(values, dense_values[order], atol=1e-7, rtol=0)
    overlaps = (vectors * dense_vectors[:, order]).sum(0).abs()  # up to sign
    assert torch.allclose(overlaps, torch.ones(k, dtype=DTYPE), atol=1e-6)
    assert torch.allclose(vectors.T @ vectors, torch.eye(k, dtype=DTYPE), atol=1e-10)


def test_top_eigenpairs_on_a_curvext_operator():
    param = torch.nn.Parameter(torch.zeros(30, dtype=DTYPE))
    param.ggn_diag = torch.arange(1.0, 31.0, dtype=DTYPE)
    D = DiagonalOperator.from_params([param])
    values, vectors = top_eigenpairs(D, 2, method="lobpcg", generator=generator())
    assert torch.allclose(values, torch.tensor([30.0, 29.0], dtype=DTYPE))
    assert torch.allclose(vectors.abs()[[29, 28], [0, 1]], torch.ones(2, dtype=DTYPE))


def test_top_eigenpairs_warns_without_convergence():
    A = symmetric_with_eigenvalues(torch.linspace(0.0, 1.0, 60, dtype=DTYPE))
    with pytest.warns(RuntimeWarning, match="not all 2 eigenpairs converged"):
        top_eigenpairs(A, 2, max_iter=5, generator=generator())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 11}, "k must be at most the dimension 10"),
        ({"k": 4, "method": "lobpcg"}, "LOBPCG needs 3k <= P"),
        ({"k": 2, "method": "arnoldi"}, "method must be 'lanczos' or 'lobpcg'"),
        ({"k": 3, "max_iter": 2}, "max_iter >= k"),
        ({"k": 1, "tol": -1.0}, "tol must be a finite number > 0"),
    ],
)
def test_top_eigenpairs_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(torch.eye(10, dtype=DTYPE), **kwargs)


# ---- Submatrix ----------------------------------------------------------------


def test_submatrix_matches_dense_slicing():
    generator_ = generator(2)
    A = torch.randn(7, 9, generator=generator_, dtype=DTYPE)
    rows, cols = [6, 0, 3, 3], [8, 1, 1, 4, 0]
    block = Submatrix(A, rows, cols)
    dense_block = A[rows][:, cols]
    assert block.shape == (4, 5)
    assert torch.allclose(block.to_dense(), dense_block)
    x = torch.randn(5, generator=generator_, dtype=DTYPE)
    X = torch.randn(5, 3, generator=generator_, dtype=DTYPE)
    assert (block @ x).shape == (4,)
    assert torch.allclose(block @ x, dense_block @ x)
    assert torch.allclose(block @ X, dense_block @ X)
    assert torch.allclose(block.T.to_dense(), dense_block.T)
    assert torch.allclose(
        block.T @ torch.ones(4, dtype=DTYPE), dense_block.T @ torch.ones(4, dtype=DTYPE)
    )


def test_submatrix_of_a_curvext_operator_and_index_tensors():
    param = torch.nn.Parameter(torch.zeros(6, dtype=DTYPE))
    param.ggn_diag = torch.arange(1.0, 7.0, dtype=DTYPE)
    D = DiagonalOperator.from_params([param])
    block = Submatrix(D, torch.tensor([1, 2, 5]), torch.tensor([2, 5]))
    assert torch.allclose(block.to_dense(), D.to_dense()[[1, 2, 5]][:, [2, 5]])
    assert torch.allclose(block.T.to_dense(), block.to_dense().T)


@pytest.mark.parametrize(
    "rows, cols, match",
    [
        ([0, 4], [0], r"row_idxs must lie in \[0, 4\), got 4"),
        ([0], [-1], r"col_idxs must lie in \[0, 5\), got -1"),
        ([], [0], "row_idxs is empty"),
        ([0.5], [0], "must be a 1-d sequence of integers"),
        ([[0]], [0], "must be a 1-d sequence of integers"),
    ],
)
def test_submatrix_index_errors(rows, cols, match):
    with pytest.raises(ValueError, match=match):
        Submatrix(torch.zeros(4, 5), rows, cols)


def test_submatrix_operand_and_operator_errors():
    block = Submatrix(torch.zeros(4, 5), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match=r"expected x of shape \[3\] or \[3, M\], got \[5\]"):
        block @ torch.zeros(5)
    with pytest.raises(ValueError, match="must be a 2-d"):
        Submatrix(torch.zeros(3), [0], [0])
    with pytest.raises(TypeError, match="must expose .shape, .dtype, .device"):
        Submatrix([[1.0]], [0], [0])
