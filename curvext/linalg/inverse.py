r"""Matrix-free inverses :math:`\mathbf{A}^{-1}`: conjugate gradients, LSMR and the Neumann series.

All are operators themselves (:class:`~curvext.linear.LinearOperator`:
``.shape``, ``.dtype``, ``.device``, ``@`` on ``[P]`` and ``[P, M]`` with its
dtype rule), so they can be passed to the estimators of :mod:`curvext.linalg`
or serve as a preconditioner.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from curvext.linalg.adapter import as_square_operator
from curvext.linalg.checks import assert_positive_int, check_positive
from curvext.linear import LinearOperator, check_damping


@dataclass
class CGInfo:
    """How the last :class:`CGInverse` solve went (one entry per right-hand side).

    Attributes:
        iterations: The number of CG iterations run (products with ``A``).
        residual_norms: The final residual norms :math:`\\|b_j - A x_j\\|` ``[M]``
            (CG's recursively updated residuals).
        rhs_norms: :math:`\\|b_j\\|` ``[M]``; convergence means
            ``residual_norms <= tol * rhs_norms``.
        converged: Whether each column converged ``[M]`` (bool).
        history: The residual norms ``[M]`` before each iteration and after the last.
    """

    iterations: int
    residual_norms: Tensor
    rhs_norms: Tensor
    converged: Tensor
    history: List[Tensor]


class CGInverse(LinearOperator):
    r"""The inverse of a symmetric positive definite :math:`\mathbf{A}` by (preconditioned) CG.

    ``CGInverse(A) @ B`` solves :math:`\mathbf{A}\mathbf{X} = \mathbf{B}` for
    all columns of ``B`` at once: every iteration multiplies ``A`` with the
    search directions of the columns that have not converged yet in one
    ``A @ X`` (the working tensors hold those columns only and are updated in
    place; a converged column is written out and dropped once), and the step
    sizes are per column,

    .. math::
        \alpha_j = \frac{\mathbf{r}_j^\top \mathbf{z}_j}{\mathbf{p}_j^\top\mathbf{A}\mathbf{p}_j},
        \quad \mathbf{x}_j \leftarrow \mathbf{x}_j + \alpha_j \mathbf{p}_j,
        \quad \mathbf{r}_j \leftarrow \mathbf{r}_j - \alpha_j \mathbf{A}\mathbf{p}_j,
        \quad \mathbf{z}_j = \mathbf{M}\mathbf{r}_j,
        \quad \mathbf{p}_j \leftarrow \mathbf{z}_j
            + \frac{\mathbf{r}_j^{\top}\mathbf{z}_j}{\mathbf{r}_j^{\mathrm{old}\top}
              \mathbf{z}_j^{\mathrm{old}}} \mathbf{p}_j,

    with :math:`\mathbf{M} \approx \mathbf{A}^{-1}` the preconditioner
    (identity by default). Column :math:`j` stops once
    :math:`\|\mathbf{r}_j\| \le \mathrm{tol}\,\|\mathbf{b}_j\|`. A curvature
    :math:`\mathbf{p}_j^\top\mathbf{A}\mathbf{p}_j \le 0` proves that
    :math:`\mathbf{A}` is not positive definite; CG then stops with an error
    instead of iterating on.

    Hestenes, M. R., & Stiefel, E. (1952). Methods of conjugate gradients for
    solving linear systems. Journal of Research of the National Bureau of Standards.

    Args:
        A: A symmetric positive definite ``[P, P]`` operator (a curvext operator,
            e.g. ``G + 1e-3``, a tensor, or anything with ``.shape``, ``.dtype``,
            ``.device`` and ``A @ X``).
        tol: Relative residual tolerance (default ``1e-6``).
        max_iter: The most iterations per solve (default ``10 * P``); a solve
            that has not converged by then warns and returns its iterate.
        preconditioner: An operator :math:`\mathbf{M} \approx \mathbf{A}^{-1}`,
            symmetric positive definite, e.g. ``K.inverse(damping=1e-3)`` of a
            :class:`~curvext.operators.KronOperator` (default: none).

    Attributes:
        info: A :class:`CGInfo` for the last solve (``None`` before the first).

    Raises:
        ValueError: If ``A`` or the preconditioner is not square, they differ in
            size, or ``tol``/``max_iter`` are not positive.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> A_inv = CGInverse(A, tol=1e-10)
        >>> (A_inv @ torch.tensor([1.0, 2.0], dtype=torch.float64)).round(decimals=6).tolist()
        [0.090909, 0.636364]
        >>> A_inv.info.iterations, bool(A_inv.info.converged.all())
        (2, True)
    """

    def __init__(
        self,
        A,
        tol: float = 1e-6,
        max_iter: Optional[int] = None,
        preconditioner=None,
    ):
        owner = "CGInverse"
        self._A = as_square_operator(A, owner)
        self.tol = check_positive(tol, "tol", owner)
        self.max_iter = (
            10 * self._A.dim
            if max_iter is None
            else assert_positive_int(max_iter, "max_iter", owner)
        )
        self._preconditioner = None
        if preconditioner is not None:
            self._preconditioner = as_square_operator(preconditioner, f"{owner} preconditioner")
            if self._preconditioner.dim != self._A.dim:
                raise ValueError(
                    f"{owner}: the preconditioner has shape "
                    f"{tuple(preconditioner.shape)}, A has {tuple(A.shape)}; they "
                    f"must have the same size."
                )
        super().__init__(self._A.shape, self._A.dtype, self._A.device)
        self.info: Optional[CGInfo] = None

    def _precondition(self, residuals: Tensor) -> Tensor:
        return residuals if self._preconditioner is None else self._preconditioner @ residuals

    def _matmat(self, rhs: Tensor) -> Tensor:
        """``A^{-1} @ rhs`` for ``rhs`` ``[P, M]``; sets :attr:`info`.

        Raises:
            ValueError: If ``A`` (or the preconditioner) turns out not to be
                positive definite, or ``rhs`` is not finite.
        """
        bad = (~torch.isfinite(rhs)).any(0).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"CGInverse: right-hand side(s) {bad[:5].tolist()} contain NaN or Inf; "
                "no solve is defined. Check the vectors (a gradient that overflowed?) "
                "before solving."
            )
        solution = torch.zeros_like(rhs)
        rhs_norms = rhs.norm(dim=0)
        thresholds = self.tol * rhs_norms
        residual_norms = rhs_norms.clone()  # the residuals start as rhs
        history = [residual_norms.clone()]
        # The working set: the unconverged columns only, updated in place, and
        # compacted (one gather) only when some column converges.
        columns = (residual_norms > thresholds).nonzero().squeeze(1)
        if columns.numel() == rhs.shape[1]:
            iterate, residuals = solution, rhs.clone()
        else:
            iterate, residuals = solution[:, columns], rhs[:, columns]
        if columns.numel():
            preconditioned = self._precondition(residuals)
            directions = preconditioned.clone()
            inner = (residuals * preconditioned).sum(0)
            self._check_preconditioner(inner, 0)
        iteration = 0
        while columns.numel() and iteration < self.max_iter:
            Ap = self._A @ directions
            curvature = (directions * Ap).sum(0)
            self._check_curvature(curvature, columns, iteration)
            step = inner / curvature
            iterate.addcmul_(directions, step)
            residuals.addcmul_(Ap, step, value=-1)
            del Ap
            preconditioned = self._precondition(residuals)
            new_inner = (residuals * preconditioned).sum(0)
            self._check_preconditioner(new_inner, iteration + 1)
            directions.mul_(new_inner / inner).add_(preconditioned)
            inner = new_inner
            norms = residuals.norm(dim=0)
            residual_norms[columns] = norms
            history.append(residual_norms.clone())
            iteration += 1
            done = norms <= thresholds[columns]
            if done.any():
                if iterate is not solution:
                    solution[:, columns[done]] = iterate[:, done]
                keep = done.logical_not()
                columns, inner = columns[keep], inner[keep]
                iterate, residuals, directions = (
                    tensor[:, keep] for tensor in (iterate, residuals, directions)
                )
        if iterate is not solution:
            solution[:, columns] = iterate
        active = ~(residual_norms <= thresholds)  # NaN is never converged
        self.info = CGInfo(iteration, residual_norms, rhs_norms, ~active, history)
        if active.any():
            warnings.warn(
                f"CGInverse: {int(active.sum())} of {rhs.shape[1]} right-hand sides did "
                f"not converge to tol={self.tol:g} in max_iter={self.max_iter} "
                f"iterations (largest relative residual "
                f"{(residual_norms / rhs_norms)[active].max().item():.3g}); raise "
                f"max_iter, loosen tol or add a preconditioner. See .info.",
                RuntimeWarning,
                stacklevel=3,
            )
        return solution

    @staticmethod
    def _check_curvature(curvature: Tensor, columns: Tensor, iteration: int) -> None:
        """Raise if some ``p^T A p <= 0`` or not finite (``columns``: the
        right-hand sides' indices)."""
        not_finite = (~torch.isfinite(curvature)).nonzero()
        if not_finite.numel():
            column = columns[not_finite[0, 0]].item()
            raise ValueError(
                f"CGInverse: A @ p is not finite (p^T A p = "
                f"{curvature[not_finite[0, 0]].item()}) for right-hand side {column} at "
                f"iteration {iteration}: A contains NaN or Inf (or overflows). Check "
                "the operator (its data, damping, dtype) before solving."
            )
        refused = (curvature <= 0).nonzero()
        if refused.numel():
            index = refused[0, 0]
            column = columns[index].item()
            raise ValueError(
                f"CGInverse: A is not positive definite: p^T A p = "
                f"{curvature[index].item():.3g} <= 0 for right-hand side {column} at "
                f"iteration {iteration}. CG only solves symmetric positive definite "
                f"systems; add damping (e.g. CGInverse(A + 1e-3)) or use another solver."
            )

    def _check_preconditioner(self, inner: Tensor, iteration: int) -> None:
        if self._preconditioner is not None and (inner < 0).any():
            raise ValueError(
                f"CGInverse: the preconditioner is not positive definite: r^T M r = "
                f"{inner.min().item():.3g} < 0 at iteration {iteration}."
            )

    def __repr__(self) -> str:
        return f"CGInverse(shape={self.shape}, tol={self.tol:g}, max_iter={self.max_iter})"


class NeumannInverse(LinearOperator):
    r"""The inverse of :math:`\mathbf{A}` by a truncated Neumann series.

    .. math::
        \mathbf{A}^{-1} = \alpha \sum_{k=0}^{\infty} (\mathbf{I} - \alpha\mathbf{A})^k
        \approx \alpha \sum_{k=0}^{K-1} (\mathbf{I} - \alpha\mathbf{A})^k ,

    which converges if and only if the spectral radius
    :math:`\rho(\mathbf{I} - \alpha\mathbf{A}) < 1`, i.e. for symmetric
    :math:`\mathbf{A}` if it is positive definite and
    :math:`0 < \alpha < 2/\lambda_{\max}(\mathbf{A})`. At construction
    :math:`\rho` is estimated by a few power iterations, and a warning is issued
    when the estimate is :math:`\ge 1`. Each product costs :math:`K - 1`
    products with ``A`` (on all columns at once). This is the series behind
    LiSSA (Agarwal, Bullins & Hazan, 2017, Second-order stochastic
    optimization for machine learning in linear time, JMLR).

    Args:
        A: A square ``[P, P]`` operator (a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``).
        scale: :math:`\alpha > 0` (default ``1.0``).
        num_terms: The number :math:`K \ge 1` of terms (default ``100``).
        power_iterations: Power iterations for the convergence check (default
            ``20``; ``0`` skips it). They underestimate :math:`\rho`, so a
            series that barely diverges may pass unnoticed.
        generator: The random number generator for the power iteration's start
            (default: a fixed seed on ``A``'s device).

    Attributes:
        spectral_radius_estimate: The estimate of :math:`\rho(\mathbf{I} - \alpha\mathbf{A})`
            (``None`` if skipped).

    Raises:
        ValueError: If ``A`` is not square, ``scale`` is not positive or
            ``num_terms`` not a positive integer.

    Example:
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=torch.float64)
        >>> A_inv = NeumannInverse(A, scale=1.0, num_terms=200)
        >>> round(A_inv.spectral_radius_estimate, 2)
        0.57
        >>> b = torch.ones(2, dtype=torch.float64)
        >>> torch.allclose(A_inv @ b, torch.linalg.solve(A, b))
        True
    """

    def __init__(
        self,
        A,
        scale: float = 1.0,
        num_terms: int = 100,
        power_iterations: int = 20,
        generator: Optional[torch.Generator] = None,
    ):
        owner = "NeumannInverse"
        self._A = as_square_operator(A, owner)
        self.scale = check_positive(scale, "scale", owner)
        self.num_terms = assert_positive_int(num_terms, "num_terms", owner)
        power_iterations = assert_positive_int(
            power_iterations, "power_iterations", owner, minimum=0
        )
        super().__init__(self._A.shape, self._A.dtype, self._A.device)
        self.spectral_radius_estimate = None
        if power_iterations:
            self.spectral_radius_estimate = self._spectral_radius(power_iterations, generator)
            if self.spectral_radius_estimate >= 1:
                warnings.warn(
                    f"NeumannInverse: the series does not converge: the spectral "
                    f"radius of I - scale * A is about {self.spectral_radius_estimate:.3g} "
                    f">= 1 for scale={self.scale:g}. It converges for positive "
                    f"definite A and 0 < scale < 2 / lambda_max(A); lower the scale "
                    f"or add damping.",
                    UserWarning,
                    stacklevel=2,
                )

    def _iteration_matrix(self, matrix: Tensor) -> Tensor:
        """``(I - scale * A) @ matrix``."""
        return matrix - self.scale * (self._A @ matrix)

    def _spectral_radius(self, iterations: int, generator) -> float:
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(0)
        vector = torch.randn(
            self._A.dim, 1, generator=generator, dtype=self.dtype, device=self.device
        )
        vector = vector / vector.norm()
        estimate = 0.0
        for _ in range(iterations):
            image = self._iteration_matrix(vector)
            estimate = image.norm().item()
            if estimate == 0.0:
                break
            vector = image / estimate
        return estimate

    def _matmat(self, rhs: Tensor) -> Tensor:
        """``A^{-1} @ rhs`` (approximately) for ``rhs`` ``[P, M]``."""
        term = self.scale * rhs
        total = term.clone()
        for _ in range(self.num_terms - 1):
            term = self._iteration_matrix(term)
            total = total + term
        return total

    def __repr__(self) -> str:
        return (
            f"NeumannInverse(shape={self.shape}, scale={self.scale:g}, num_terms={self.num_terms})"
        )


#: LSMR's stopping reasons (``istop``) that mean the column was solved.
_LSMR_SOLVED = (0, 1, 2, 4, 5)
_LSMR_REASONS = {
    3: "the estimate of cond(A) exceeded conlim",
    6: "the estimate of cond(A) exceeded 1/eps",
    7: "maxiter was reached",
}


@dataclass
class LSMRInfo:
    """How the last :class:`LSMRInverse` solve went (one entry per right-hand side, ``[M]``).

    Attributes:
        stop_reasons: SciPy's ``istop`` (int64): ``0`` ``x = 0`` solves it,
            ``1`` ``A x = b`` solved to ``atol``/``btol``, ``2`` least squares
            solved to ``atol``, ``3`` cond(A) exceeded ``conlim``, ``4``/``5``
            as ``1``/``2`` to machine precision, ``6`` cond(A) exceeded
            ``1/eps``, ``7`` ``maxiter`` reached.
        iterations: The iterations run per column (one product with ``A`` and
            one with ``A^T`` each), int64.
        residual_norms: :math:`\\|b - A x\\|` (with ``damp``: of the stacked
            system :math:`[A; \\mathrm{damp}\\, I]`).
        normal_residual_norms: :math:`\\|A^\\top (b - A x)\\|` (stacked system
            with ``damp``), ``0`` at a least-squares solution.
        rhs_norms: :math:`\\|b\\|`.
        norm_estimates: LSMR's estimate of :math:`\\|A\\|_F`.
        condition_estimates: LSMR's estimate of cond(A).
        converged: ``stop_reasons`` in ``{0, 1, 2, 4, 5}`` (bool).
    """

    stop_reasons: Tensor
    iterations: Tensor
    residual_norms: Tensor
    normal_residual_norms: Tensor
    rhs_norms: Tensor
    norm_estimates: Tensor
    condition_estimates: Tensor
    converged: Tensor


class LSMRInverse(LinearOperator):
    r"""The (pseudo-)inverse of a square :math:`\mathbf{A}` by LSMR, applied column by column.

    ``LSMRInverse(A) @ b`` runs SciPy's LSMR (Fong & Saunders, 2011), which
    minimises

    .. math::
        \left\| \begin{pmatrix} \mathbf{A} \\ \mathrm{damp}\,\mathbf{I} \end{pmatrix}
        \mathbf{x} - \begin{pmatrix} \mathbf{b} \\ \mathbf{0} \end{pmatrix}
        \right\|_2 ,
        \qquad\text{i.e.}\qquad
        \mathbf{x} = (\mathbf{A}^\top\mathbf{A} + \mathrm{damp}^2\,\mathbf{I})^{-1}
        \mathbf{A}^\top\mathbf{b},

    by a Krylov method on :math:`\mathbf{A}^\top\mathbf{A}` that needs one
    product with :math:`\mathbf{A}` and one with :math:`\mathbf{A}^\top` per
    iteration (MINRES on the normal equations). For invertible
    :math:`\mathbf{A}` and ``damp=0`` that is :math:`\mathbf{A}^{-1}\mathbf{b}`;
    for singular :math:`\mathbf{A}` the iterates stay in the row space, so it
    converges to the minimum-norm least-squares solution
    :math:`\mathbf{A}^{+}\mathbf{b}`. Unlike :class:`CGInverse`, :math:`\mathbf{A}`
    need not be symmetric or definite. Note that ``damp`` regularises the
    least-squares problem: it does *not* give
    :math:`(\mathbf{A} + \mathrm{damp}\,\mathbf{I})^{-1}\mathbf{b}`; for that pass
    ``A + damp`` (a curvext operator) instead.

    Column :math:`j` stops once :math:`\|\mathbf{r}_j\| \le \mathrm{atol}\,
    \|\mathbf{A}\|\|\mathbf{x}_j\| + \mathrm{btol}\|\mathbf{b}_j\|`
    (consistent system) or :math:`\|\mathbf{A}^\top\mathbf{r}_j\| \le
    \mathrm{atol}\,\|\mathbf{A}\|\|\mathbf{r}_j\|` (least squares), with
    :math:`\|\mathbf{A}\|` LSMR's running estimate; or when its estimate of
    cond(A) exceeds ``conlim``, or after ``maxiter`` iterations (both warn).

    SciPy's LSMR takes one right-hand side, so ``[P, M]`` is solved by ``M``
    runs; every product with ``A`` is computed in torch on ``A``'s device and
    dtype, while LSMR's own vector updates run in float64 NumPy on the CPU
    (as in curvlinops' ``LSMRInverseLinearOperator``, which passes the same
    keyword arguments to SciPy). The solution is returned in ``A``'s dtype on
    its device.

    Fong, D. C.-L., & Saunders, M. A. (2011). LSMR: An iterative algorithm for
    sparse least-squares problems. SIAM Journal on Scientific Computing.

    Args:
        A: A square ``[P, P]`` operator (a curvext operator, a tensor, or
            anything with ``.shape``, ``.dtype``, ``.device``, ``A @ X`` and
            ``A.T @ X``; curvext operators are symmetric, so ``A.T`` is ``A``).
        atol: Stopping tolerance on the relative error in ``A`` (default
            ``1e-6``; ``0`` with ``btol = conlim = 0``: to machine precision).
        btol: Stopping tolerance on the relative error in ``b`` (default ``1e-6``).
        maxiter: The most iterations per right-hand side (default ``10 * P``,
            as for :class:`CGInverse`; SciPy's default ``P`` is often too few
            in floating point, e.g. for float32 products).
        damp: The regularisation :math:`\mathrm{damp} \ge 0` above (default ``0``).
        conlim: Stop when the estimate of cond(A) exceeds it (default ``1e8``;
            ``0``: no limit).

    Attributes:
        info: A :class:`LSMRInfo` for the last solve (``None`` before the first).

    Raises:
        ValueError: If ``A`` is not square, or a tolerance, ``damp``,
            ``conlim`` or ``maxiter`` is negative (``maxiter``: not a positive
            integer).
        TypeError: If ``A`` lacks ``.shape``, ``.dtype``, ``.device``, ``@`` or ``.T``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> A_inv = LSMRInverse(A, atol=1e-12, btol=1e-12)
        >>> (A_inv @ torch.tensor([1.0, 2.0], dtype=torch.float64)).round(decimals=6).tolist()
        [0.090909, 0.636364]
        >>> bool(A_inv.info.converged.all())
        True
        >>> singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> (LSMRInverse(singular, atol=1e-12, btol=1e-12) @ b).round(decimals=6).tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        A,
        atol: float = 1e-6,
        btol: float = 1e-6,
        maxiter: Optional[int] = None,
        damp: float = 0.0,
        conlim: float = 1e8,
    ):
        owner = "LSMRInverse"
        self._A = as_square_operator(A, owner)
        if getattr(A, "T", None) is None:
            raise TypeError(
                f"{owner}: LSMR multiplies by A and A^T, but {type(A).__name__} has "
                f"no .T; pass a curvext operator or a tensor, or use CGInverse for a "
                f"symmetric positive definite A."
            )
        self.atol = check_damping(atol, f"{owner}: atol")
        self.btol = check_damping(btol, f"{owner}: btol")
        self.damp = check_damping(damp, f"{owner}: damp")
        self.conlim = check_damping(conlim, f"{owner}: conlim")
        self.maxiter = (
            10 * self._A.dim if maxiter is None else assert_positive_int(maxiter, "maxiter", owner)
        )
        super().__init__(self._A.shape, self._A.dtype, self._A.device)
        self._scipy_A = self._A.to_scipy()
        self.info: Optional[LSMRInfo] = None

    @property
    def T(self) -> "LSMRInverse":
        r""":math:`(\mathbf{A}^{-1})^\top = (\mathbf{A}^\top)^{-1}`, with the same options."""
        return LSMRInverse(
            self._A.operator.T,
            atol=self.atol,
            btol=self.btol,
            maxiter=self.maxiter,
            damp=self.damp,
            conlim=self.conlim,
        )

    def _result_dtype(self, operand_dtype: torch.dtype) -> torch.dtype:
        # not the root's promoted dtype: the solution comes in A's dtype, as documented above
        return self.dtype

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``A^{-1} @ matrix`` (least squares) for ``matrix`` ``[P, M]``; sets :attr:`info`."""
        from scipy.sparse.linalg import lsmr

        columns = matrix.detach().to("cpu", torch.float64).numpy()
        solutions, results = [], []
        for column in columns.T:
            solution, *result = lsmr(
                self._scipy_A,
                column,
                damp=self.damp,
                atol=self.atol,
                btol=self.btol,
                conlim=self.conlim,
                maxiter=self.maxiter,
            )
            solutions.append(torch.as_tensor(solution))
            results.append(result)
        solution = torch.stack(solutions, 1).to(self.device, self.dtype)
        self.info = self._info(results, matrix.norm(dim=0))
        return solution

    def _info(self, results, rhs_norms: Tensor) -> LSMRInfo:
        def as_tensor(values, dtype=torch.float64):
            return torch.tensor(values, dtype=dtype, device=self.device)

        stop_reasons, iterations, normr, normar, norma, conda, _ = zip(*results)
        stop_reasons = as_tensor(stop_reasons, torch.int64)
        converged = torch.isin(stop_reasons, as_tensor(_LSMR_SOLVED, torch.int64))
        info = LSMRInfo(
            stop_reasons=stop_reasons,
            iterations=as_tensor(iterations, torch.int64),
            residual_norms=as_tensor(normr),
            normal_residual_norms=as_tensor(normar),
            rhs_norms=rhs_norms.to(self.device, torch.float64),
            norm_estimates=as_tensor(norma),
            condition_estimates=as_tensor(conda),
            converged=converged,
        )
        if not converged.all():
            reasons = sorted({_LSMR_REASONS[int(reason)] for reason in stop_reasons[~converged]})
            warnings.warn(
                f"LSMRInverse: {int((~converged).sum())} of {len(results)} right-hand "
                f"sides stopped before the tolerances were met: {'; '.join(reasons)} "
                f"(maxiter={self.maxiter}, conlim={self.conlim:g}). Raise maxiter or "
                f"conlim, loosen atol/btol, or add damping. See .info.",
                RuntimeWarning,
                stacklevel=4,
            )
        return info

    def __repr__(self) -> str:
        return (
            f"LSMRInverse(shape={self.shape}, atol={self.atol:g}, btol={self.btol:g}, "
            f"maxiter={self.maxiter}, damp={self.damp:g})"
        )
