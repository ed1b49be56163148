r"""Extreme eigenpairs of a symmetric operator in torch: Lanczos and LOBPCG.

Both methods only call ``A @ X`` (no scipy in the loop), so they run on the
operator's device and dtype. :func:`lanczos` is also the core of the spectral
densities of :mod:`curvext.linalg.spectrum`.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from curvext.linalg.adapter import SquareOperator, as_square_operator
from curvext.linalg.checks import assert_positive_int, check_positive

#: The methods :func:`top_eigenpairs` accepts.
EIGEN_METHODS = ("lanczos", "lobpcg")


def _orthogonalize(vectors: Tensor, basis: Tensor) -> Tensor:
    """``vectors`` ``[R, P]`` minus their projections onto the rows of ``basis`` ``[R, m, P]``,
    twice.

    Twice is enough (Giraud et al., 2005: "twice is enough" for classical
    Gram–Schmidt) to keep the Lanczos basis orthonormal to working precision.
    Batched matrix-vector products on the rows (a leading slice of the
    basis is a strided view ``bmm`` reads in place): no ``[R, m, P]`` copy.
    """
    vectors = vectors.unsqueeze(2)  # [R, P, 1]
    for _ in range(2):
        coefficients = torch.bmm(basis, vectors)  # [R, m, 1]
        vectors = torch.baddbmm(vectors, basis.transpose(1, 2), coefficients, alpha=-1.0)
    return vectors.squeeze(2)


def _row_dots(first: Tensor, second: Tensor) -> Tensor:
    """``[R]``: the dot products of the rows of ``first`` and ``second`` ``[R, P]``, no
    ``[R, P]`` product."""
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).reshape(-1)


def lanczos(
    A, start: Tensor, num_steps: int, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``num_steps`` Lanczos steps with full reorthogonalisation from each column of ``start``.

    For a start vector :math:`\mathbf{q}_1 = \mathbf{v}/\|\mathbf{v}\|` it builds
    an orthonormal basis :math:`\mathbf{Q} = [\mathbf{q}_1, \dots, \mathbf{q}_m]`
    of the Krylov space :math:`\mathcal{K}_m(\mathbf{A}, \mathbf{v})` and the
    tridiagonal :math:`\mathbf{T} = \mathbf{Q}^\top\mathbf{A}\mathbf{Q}`
    (diagonal :math:`\alpha_j`, off-diagonal :math:`\beta_j`). Each new vector
    is orthogonalised against the whole basis (twice), which removes the ghost
    eigenvalues of plain Lanczos at the cost of storing ``Q``. The ``R`` columns
    of ``start`` run as ``R`` independent Lanczos processes whose products share
    one ``A @ X`` ``[P, R]`` per step.

    With :math:`\mathbf{T} = \mathbf{S}\,\mathrm{diag}(\boldsymbol{\theta})\,\mathbf{S}^\top`,
    the Ritz values :math:`\theta_i` and weights :math:`w_i = S_{1i}^2` form the
    Gauss quadrature :math:`\mathbf{q}_1^\top f(\mathbf{A})\mathbf{q}_1 \approx
    \sum_i w_i f(\theta_i)`, exact for polynomials of degree :math:`\le 2m-1`
    (Golub & Meurant, 2010, Matrices, Moments and Quadrature with Applications).

    If the Krylov space becomes invariant (:math:`\beta_j \le \sqrt{\epsilon}\,
    \|\mathbf{A}\|`), :math:`\beta_j` is set to zero and the process continues
    from a random vector orthogonal to the basis: :math:`\mathbf{T}` decouples
    and the new block carries zero quadrature weight.

    Args:
        A: A symmetric ``[P, P]`` operator (anything :func:`as_square_operator` takes).
        start: The start vectors ``[P]`` or ``[P, R]`` (need not be normalised).
        num_steps: The number of steps :math:`m`, ``1 <= m <= P``.
        generator: For the random restart after an invariant subspace.

    Returns:
        ``(alphas [R, m], betas [R, m - 1], basis [R, P, m])``.

    Raises:
        ValueError: If ``num_steps`` is not in ``[1, P]`` or ``start`` has a
            wrong shape or a zero column.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> alphas, betas, basis = lanczos(A, torch.ones(3, dtype=torch.float64), 3)
        >>> ritz_values = torch.linalg.eigvalsh(
        ...     torch.diag(alphas[0]) + torch.diag(betas[0], 1) + torch.diag(betas[0], -1))
        >>> ritz_values.round(decimals=10).tolist()
        [1.0, 2.0, 3.0]
    """
    owner = "lanczos"
    A = as_square_operator(A, owner)
    dim = A.dim
    num_steps = assert_positive_int(num_steps, "num_steps", owner)
    if num_steps > dim:
        raise ValueError(
            f"{owner}: num_steps must be at most the dimension {dim} of A (the "
            f"Krylov space has no more directions), got {num_steps}."
        )
    if not isinstance(start, Tensor) or start.ndim not in (1, 2) or start.shape[0] != dim:
        shape = list(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"{owner}: start must have shape [{dim}] or [{dim}, R], got {shape}.")
    vectors = start.reshape(dim, -1).to(A.dtype).T.clone()  # [R, P]
    norms = vectors.norm(dim=1)
    if (norms == 0).any():
        raise ValueError(f"{owner}: start has a zero column; use a nonzero vector.")
    vectors = vectors / norms[:, None]
    repeats = vectors.shape[0]
    # [R, m, P]: each basis vector a contiguous row, so that a leading slice of
    # the basis is read in place by _orthogonalize (returned as a [R, P, m] view)
    basis = torch.zeros(repeats, num_steps, dim, dtype=A.dtype, device=A.device)
    alphas = torch.zeros(repeats, num_steps, dtype=A.dtype, device=A.device)
    betas = torch.zeros(repeats, max(num_steps - 1, 0), dtype=A.dtype, device=A.device)
    operator_norm = torch.zeros(repeats, dtype=A.dtype, device=A.device)
    tiny = torch.finfo(A.dtype).eps ** 0.5
    for step in range(num_steps):
        basis[:, step] = vectors
        products = (A @ vectors.T).T  # [R, P]
        operator_norm = torch.maximum(operator_norm, products.norm(dim=1))
        alphas[:, step] = _row_dots(products, vectors)
        if step == num_steps - 1:
            break
        residuals = _orthogonalize(products, basis[:, : step + 1])
        del products
        beta = residuals.norm(dim=1)
        invariant = beta <= tiny * operator_norm
        if invariant.any():
            fresh = torch.randn(
                int(invariant.sum()),
                dim,
                generator=generator,
                dtype=A.dtype,
                device=A.device,
            )
            fresh = _orthogonalize(fresh, basis[invariant, : step + 1])
            fresh = _orthogonalize(fresh, basis[invariant, : step + 1])
            residuals[invariant] = fresh / fresh.norm(dim=1, keepdim=True)
            beta = torch.where(invariant, torch.zeros_like(beta), beta)
        betas[:, step] = beta
        vectors = residuals.div_(torch.where(invariant, torch.ones_like(beta), beta)[:, None])
    return alphas, betas, basis.transpose(1, 2)


def tridiagonal_eigh(alphas: Tensor, betas: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigenvalues ``[R, m]`` (ascending) and eigenvectors ``[R, m, m]`` of the tridiagonals."""
    T = torch.diag_embed(alphas) + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    return torch.linalg.eigh(T)


def _select(values: Tensor, k: int, largest: bool) -> Tensor:
    """The indices of the ``k`` largest (or smallest) ``values``, in descending (ascending)
    order."""
    return torch.sort(values, descending=largest).indices[:k]


def _lanczos_eigenpairs(
    A: SquareOperator, k: int, largest: bool, tol: float, max_iter: int, generator
) -> Tuple[Tensor, Tensor, bool]:
    """Ritz pairs from one Lanczos run of ``max_iter`` steps (converged or not)."""
    start = torch.randn(A.dim, 1, generator=generator, dtype=A.dtype, device=A.device)
    alphas, betas, basis = lanczos(A, start, max_iter, generator)
    ritz_values, ritz_vectors = tridiagonal_eigh(alphas, betas)
    chosen = _select(ritz_values[0], k, largest)
    eigenvalues = ritz_values[0, chosen]
    eigenvectors = basis[0] @ ritz_vectors[0][:, chosen]
    residuals = (A @ eigenvectors - eigenvectors * eigenvalues).norm(dim=0)
    scale = ritz_values[0].abs().max().clamp_min(torch.finfo(A.dtype).tiny)
    return eigenvalues, eigenvectors, bool((residuals <= tol * scale).all())


def _lobpcg_eigenpairs(
    A: SquareOperator, k: int, largest: bool, tol: float, max_iter: int, generator
) -> Tuple[Tensor, Tensor, bool]:
    r"""Block LOBPCG (Knyazev, 2001) with Rayleigh–Ritz on
    :math:`[\mathbf{X}, \mathbf{R}, \mathbf{P}]`.

    The trial space is orthonormalised by a Householder QR, whose ``Q`` stays
    orthonormal even when the block is rank-deficient near convergence.
    """
    sign = 1.0 if largest else -1.0
    X = torch.randn(A.dim, k, generator=generator, dtype=A.dtype, device=A.device)
    X = torch.linalg.qr(X).Q
    directions = None
    converged = False
    for _ in range(max_iter):
        AX = A @ X
        rayleigh = X.T @ AX
        values, rotation = torch.linalg.eigh((rayleigh + rayleigh.T) / 2)
        order = _select(values, k, largest)
        values, rotation = values[order], rotation[:, order]
        X, AX = X @ rotation, AX @ rotation
        residuals = AX - X * values
        scale = values.abs().max().clamp_min(torch.finfo(A.dtype).tiny)
        if (residuals.norm(dim=0) <= tol * scale).all():
            converged = True
            break
        blocks = [X, residuals] if directions is None else [X, residuals, directions]
        trial = torch.linalg.qr(torch.cat(blocks, dim=1)).Q
        projected = trial.T @ (A @ trial)
        trial_values, trial_vectors = torch.linalg.eigh(sign * (projected + projected.T) / 2)
        top = trial_vectors[:, -k:].flip(1)
        new_X = trial @ top
        # The new search directions: the part of the update outside span(X).
        directions = new_X - X @ (X.T @ new_X)
        directions = torch.linalg.qr(directions).Q
        X = new_X
    else:
        AX = A @ X
        rayleigh = X.T @ AX
        values, rotation = torch.linalg.eigh((rayleigh + rayleigh.T) / 2)
        order = _select(values, k, largest)
        values, X = values[order], X @ rotation[:, order]
    return values, X, converged


def top_eigenpairs(
    A,
    k: int,
    method: str = "lanczos",
    largest: bool = True,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The ``k`` largest (or smallest) eigenvalues and eigenvectors of a symmetric ``A``.

    * ``method="lanczos"``: one Lanczos run of ``max_iter`` steps with full
      reorthogonalisation (:func:`lanczos`) from a random start, then the Ritz
      pairs :math:`(\theta_i, \mathbf{Q}\mathbf{s}_i)` of the tridiagonal
      :math:`\mathbf{T}`. Costs ``max_iter`` products with one vector and
      stores ``max_iter`` vectors of length ``P``.
    * ``method="lobpcg"``: block LOBPCG (Knyazev, 2001, Toward the optimal
      preconditioned eigensolver, SIAM J. Sci. Comput.) on ``k`` vectors, up
      to ``max_iter`` iterations of about ``3k`` products each, in one
      ``A @ X`` per iteration. Suits operators whose products with many
      vectors at once are cheap (a batched ``@``).

    A pair counts as converged once
    :math:`\|\mathbf{A}\mathbf{x} - \theta\mathbf{x}\| \le \mathrm{tol}\,|\theta_{\max}|`;
    if any of the ``k`` has not, a ``RuntimeWarning`` names the fix. Both run
    in torch on ``A``'s device and dtype; nothing goes through scipy.

    Args:
        A: A symmetric ``[P, P]`` operator: a curvext operator, a tensor, or
            anything with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``.
        k: How many eigenpairs, ``1 <= k <= P`` (``3k <= P`` for LOBPCG).
        method: ``"lanczos"`` (default) or ``"lobpcg"``.
        largest: The largest (default) or the smallest eigenvalues (algebraically).
        tol: Relative residual tolerance (default ``sqrt(eps)`` of the dtype:
            ``1.5e-8`` in float64, ``3.5e-4`` in float32).
        max_iter: Lanczos steps (default ``min(P, max(2k + 60, 10k))``) or
            LOBPCG iterations (default ``200``).
        generator: The random number generator for the start (default: torch's
            global one).

    Returns:
        ``(eigenvalues [k], eigenvectors [P, k])``, sorted descending for
        ``largest=True`` and ascending otherwise; the columns are orthonormal
        and their signs arbitrary.

    Raises:
        ValueError: If ``A`` is not square, ``k`` is out of range or the method
            is unknown.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> values, vectors = top_eigenpairs(A, k=2)
        >>> values.round(decimals=8).tolist(), vectors.shape
        ([10.0, 9.0], torch.Size([10, 2]))
    """
    owner = "top_eigenpairs"
    A = as_square_operator(A, owner)
    k = assert_positive_int(k, "k", owner)
    if method not in EIGEN_METHODS:
        raise ValueError(f"{owner}: method must be 'lanczos' or 'lobpcg', got {method!r}.")
    if k > A.dim:
        raise ValueError(f"{owner}: k must be at most the dimension {A.dim} of A, got {k}.")
    if method == "lobpcg" and 3 * k > A.dim:
        raise ValueError(
            f"{owner}: LOBPCG needs 3k <= P (its trial space has 3k vectors), got "
            f"k={k} for P={A.dim}; use method='lanczos' or a smaller k."
        )
    tol = torch.finfo(A.dtype).eps ** 0.5 if tol is None else check_positive(tol, "tol", owner)
    if method == "lanczos":
        max_iter = (
            min(A.dim, max(2 * k + 60, 10 * k))
            if max_iter is None
            else min(A.dim, assert_positive_int(max_iter, "max_iter", owner))
        )
        if max_iter < k:
            raise ValueError(
                f"{owner}: Lanczos needs max_iter >= k to find k Ritz pairs, got "
                f"max_iter={max_iter} for k={k}."
            )
        solve = _lanczos_eigenpairs
    else:
        max_iter = 200 if max_iter is None else assert_positive_int(max_iter, "max_iter", owner)
        solve = _lobpcg_eigenpairs
    with torch.no_grad():
        values, vectors, converged = solve(A, k, largest, tol, max_iter, generator)
    if not converged:
        warnings.warn(
            f"{owner}: not all {k} eigenpairs converged to tol={tol:g} with "
            f"method={method!r} in max_iter={max_iter}; raise max_iter or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    return values, vectors
