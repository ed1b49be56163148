r"""Spectral densities by stochastic Lanczos quadrature (Papyan, 2020).

The spectral density of a symmetric :math:`\mathbf{A} \in \mathbb{R}^{P\times P}`
with eigenvalues :math:`\lambda_1, \dots, \lambda_P` is
:math:`\phi(t) = \frac{1}{P}\sum_{i=1}^P \delta(t - \lambda_i)`. For a random
unit vector :math:`\mathbf{q}` (:math:`\mathbb{E}[\mathbf{q}\mathbf{q}^\top] =
\mathbf{I}/P`), :math:`\mathbb{E}[\mathbf{q}^\top \delta(t\mathbf{I} -
\mathbf{A})\mathbf{q}] = \phi(t)`, and ``ncv`` Lanczos steps from
:math:`\mathbf{q}` give the Gauss quadrature :math:`\sum_{i=1}^{\mathrm{ncv}}
w_i \delta(t - \theta_i)` of it (see :func:`~curvext.linalg.eigen.lanczos`).
Each delta is widened to a Gaussian and the densities of ``num_repeats``
independent start vectors are averaged:

.. math::
    \hat\phi(t) = \frac{1}{R}\sum_{r=1}^{R}\sum_{i=1}^{\mathrm{ncv}} w_i^{(r)}
    \,\mathcal{N}\bigl(t;\,\theta_i^{(r)},\,\sigma^2\bigr).

The width :math:`\sigma` is set on the spectrum mapped to :math:`[-1, 1]`
(the interval ``boundaries`` widened by ``margin`` on each side):
:math:`\sigma = \frac{2}{(\mathrm{ncv} - 1)\sqrt{8 \ln \kappa}}`, i.e. two
neighbouring Chebyshev-spaced nodes :math:`2/(\mathrm{ncv}-1)` apart
overlap with value :math:`1/\kappa` of the peak at their midpoint.

Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
spectra. JMLR 21(252), Algorithm 2 and Sections C.7, D.2 (defaults
``kappa=3``, ``margin=0.05``, ``epsilon=1e-5``). Unlike Algorithm 2, the
Lanczos runs here reorthogonalise fully (no ghost eigenvalues), all
``num_repeats`` runs share one ``A @ X`` per step, and the spectral
boundaries default to the extreme Ritz values of these same runs instead of
extra eigensolver calls.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from curvext.linalg.adapter import as_square_operator
from curvext.linalg.checks import assert_positive_int, check_positive
from curvext.linalg.eigen import lanczos, tridiagonal_eigh

Boundaries = Optional[Tuple[Optional[float], Optional[float]]]


def _check_kappa(kappa, owner: str) -> float:
    kappa = check_positive(kappa, "kappa", owner)
    if kappa <= 1:
        raise ValueError(
            f"{owner}: kappa must be > 1 (the Gaussian width is "
            f"2 / ((ncv - 1) sqrt(8 ln kappa))), got {kappa!r}."
        )
    return kappa


def _check_margin(margin, owner: str) -> float:
    if (
        isinstance(margin, bool)
        or not isinstance(margin, numbers.Real)
        or not (math.isfinite(margin) and margin >= 0)
    ):
        raise ValueError(f"{owner}: margin must be a finite number >= 0, got {margin!r}.")
    return float(margin)


def _check_boundaries(boundaries, owner: str) -> Tuple[Optional[float], Optional[float]]:
    if boundaries is None:
        return None, None
    if not isinstance(boundaries, (tuple, list)) or len(boundaries) != 2:
        raise ValueError(
            f"{owner}: boundaries must be a pair (low, high) of numbers or None, got "
            f"{boundaries!r}."
        )
    low, high = (None if b is None else float(b) for b in boundaries)
    if low is not None and high is not None and not low < high:
        raise ValueError(f"{owner}: boundaries must satisfy low < high, got {tuple(boundaries)}.")
    return low, high


def _widen_if_degenerate(low: float, high: float, dtype: torch.dtype) -> Tuple[float, float]:
    """``[low, high]``, or a window of half its centre's size if it is empty to round-off.

    The Ritz values of a multiple of the identity agree up to round-off; an
    interval that narrow would give Gaussians narrower than the grid spacing.
    """
    scale = max(abs(low), abs(high))
    if high - low > torch.finfo(dtype).eps ** 0.5 * scale and high > low:
        return low, high
    centre = (low + high) / 2
    half_window = 0.5 * abs(centre) if centre != 0 else 0.5
    return centre - half_window, centre + half_window


def _gaussian_bumps(points: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """``sum_i weights_i N(points; nodes_i, sigma^2)`` averaged over the leading axis."""
    standardised = (points[None, None, :] - nodes[:, :, None]) / sigma
    bumps = torch.exp(-0.5 * standardised**2) / (sigma * math.sqrt(2 * math.pi))
    return (weights[:, :, None] * bumps).sum(1).mean(0)


class LanczosSpectrum:
    r"""Cached Lanczos runs of a symmetric ``A`` for spectral densities of ``A`` and
    ``log(|A| + εI)``.

    The ``num_repeats`` Lanczos runs (``ncv`` steps each, from independent
    Gaussian start vectors) happen once, at construction; :meth:`density` and
    :meth:`log_density` then reuse their nodes :math:`\theta_i` and weights
    :math:`w_i` for any grid resolution, width or margin without products
    with ``A``. :func:`lanczos_spectrum` and :func:`lanczos_log_spectrum` are
    one-call shortcuts. See :mod:`curvext.linalg.spectrum` for the method.

    Args:
        A: A symmetric ``[P, P]`` operator: a curvext operator, a tensor, or
            anything with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``.
        ncv: The number of Lanczos steps (quadrature nodes) per run,
            ``2 <= ncv <= P``; costs ``ncv`` products with ``[P, num_repeats]``
            and stores ``num_repeats * ncv`` vectors of length ``P``.
        num_repeats: The number of independent runs averaged over (default ``1``).
        generator: The random number generator for the start vectors (default:
            torch's global one).

    Attributes:
        nodes: The Ritz values :math:`\theta_i^{(r)}` ``[num_repeats, ncv]``.
        weights: The quadrature weights :math:`w_i^{(r)}` ``[num_repeats, ncv]``
            (each row sums to one).

    Raises:
        ValueError: If ``A`` is not square, or ``ncv``/``num_repeats`` are out of range.

    Example:
        >>> A = torch.diag(torch.linspace(1.0, 2.0, 50, dtype=torch.float64))
        >>> spectrum = LanczosSpectrum(A, ncv=20, num_repeats=2)
        >>> grid, density = spectrum.density(num_points=512)
        >>> grid.shape, round(torch.trapezoid(density, grid).item(), 2)
        (torch.Size([512]), 1.0)
    """

    def __init__(
        self,
        A,
        ncv: int,
        num_repeats: int = 1,
        generator: Optional[torch.Generator] = None,
    ):
        owner = "LanczosSpectrum"
        A = as_square_operator(A, owner)
        ncv = assert_positive_int(ncv, "ncv", owner, minimum=2)
        if ncv > A.dim:
            raise ValueError(f"{owner}: ncv must be at most the dimension {A.dim} of A, got {ncv}.")
        num_repeats = assert_positive_int(num_repeats, "num_repeats", owner)
        self.ncv, self.num_repeats, self.dtype = ncv, num_repeats, A.dtype
        start = torch.randn(A.dim, num_repeats, generator=generator, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            alphas, betas, _ = lanczos(A, start, ncv, generator)
            self.nodes, eigenvectors = tridiagonal_eigh(alphas, betas)
        self.weights = eigenvectors[:, 0, :] ** 2

    def _interval(self, low, high, margin: float) -> Tuple[float, float]:
        """``[low, high]`` (Ritz extremes where ``None``) widened by ``margin`` of its width."""
        low = self.nodes.min().item() if low is None else low
        high = self.nodes.max().item() if high is None else high
        low, high = _widen_if_degenerate(low, high, self.dtype)
        padding = margin * (high - low)
        return low - padding, high + padding

    def _sigma(self, kappa: float) -> float:
        return 2.0 / ((self.ncv - 1) * math.sqrt(8.0 * math.log(kappa)))

    def density(
        self,
        num_points: int = 1024,
        kappa: float = 3.0,
        boundaries: Boundaries = None,
        margin: float = 0.05,
    ) -> Tuple[Tensor, Tensor]:
        r"""The density :math:`\hat\phi` of the eigenvalues of ``A`` on an even grid.

        Args:
            num_points: The number of grid points (default ``1024``).
            kappa: The width parameter :math:`\kappa > 1` (default ``3``; larger
                is smoother).
            boundaries: ``(λ_min, λ_max)`` estimates; a ``None`` entry (default:
                both) takes the extreme Ritz value of the runs, which lies
                inside the spectrum and converges to its end within few steps.
            margin: The grid extends ``margin`` times the width of the
                boundaries beyond each end (default ``0.05``).

        Returns:
            ``(grid [num_points], density [num_points])``; the density
            integrates to about one over the grid (minus the Gaussian tails
            beyond it).

        Raises:
            ValueError: For out-of-range arguments.
        """
        owner = "LanczosSpectrum.density"
        num_points = assert_positive_int(num_points, "num_points", owner, minimum=2)
        kappa, margin = _check_kappa(kappa, owner), _check_margin(margin, owner)
        low, high = self._interval(*_check_boundaries(boundaries, owner), margin)
        grid = torch.linspace(low, high, num_points, dtype=self.dtype, device=self.nodes.device)
        half_width = (high - low) / 2
        density = _gaussian_bumps(grid, self.nodes, self.weights, self._sigma(kappa) * half_width)
        return grid, density

    def log_density(
        self,
        num_points: int = 1024,
        kappa: float = 1.04,
        boundaries: Boundaries = None,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> Tuple[Tensor, Tensor]:
        r"""The eigenvalue density of :math:`|\mathbf{A}| + \epsilon\mathbf{I}`, smoothed in log
        space.

        The nodes become :math:`\log(|\theta_i| + \epsilon)` and are widened by
        Gaussians there (Papyan, 2020, Section C.7), which resolves spectra
        spanning many orders of magnitude. The grid is returned in the
        original units, :math:`x = e^{t}` (log-spaced), with the density
        with respect to :math:`x`, :math:`\hat\phi_x(x) = \hat\phi_t(\log x)/x`,
        so that ``torch.trapezoid(density, grid)`` is about one and a plot
        with a logarithmic x-axis shows the log-spectrum.

        Args:
            num_points: The number of grid points (default ``1024``).
            kappa: The width parameter :math:`\kappa > 1` in log space
                (default ``1.04``, as curvlinops uses to reproduce Papyan's Fig. 15b).
            boundaries: ``(min |λ|, max |λ|)`` estimates; ``None`` entries take
                the extreme :math:`|\theta_i|` of the runs.
            margin: Relative margin on the log-scale interval (default ``0.05``).
            epsilon: The shift :math:`\epsilon > 0` (default ``1e-5``).

        Returns:
            ``(grid [num_points], density [num_points])``, the grid log-spaced
            in ``[(min|λ| + ε) e^{-pad}, (max|λ| + ε) e^{pad}]``.

        Raises:
            ValueError: For out-of-range arguments or negative boundaries.
        """
        owner = "LanczosSpectrum.log_density"
        num_points = assert_positive_int(num_points, "num_points", owner, minimum=2)
        kappa, margin = _check_kappa(kappa, owner), _check_margin(margin, owner)
        epsilon = check_positive(epsilon, "epsilon", owner)
        low, high = _check_boundaries(boundaries, owner)
        if (low is not None and low < 0) or (high is not None and high < 0):
            raise ValueError(
                f"{owner}: boundaries bound |λ| and must be >= 0, got {tuple(boundaries)}."
            )
        magnitudes = self.nodes.abs()
        low = magnitudes.min().item() if low is None else low
        high = magnitudes.max().item() if high is None else high
        log_low, log_high = self._log_interval(low, high, epsilon, margin)
        log_grid = torch.linspace(
            log_low, log_high, num_points, dtype=self.dtype, device=self.nodes.device
        )
        half_width = (log_high - log_low) / 2
        log_density = _gaussian_bumps(
            log_grid,
            torch.log(magnitudes + epsilon),
            self.weights,
            self._sigma(kappa) * half_width,
        )
        grid = log_grid.exp()
        return grid, log_density / grid

    def _log_interval(self, low: float, high: float, epsilon: float, margin: float):
        log_low, log_high = math.log(low + epsilon), math.log(high + epsilon)
        log_low, log_high = _widen_if_degenerate(log_low, log_high, self.dtype)
        padding = margin * (log_high - log_low)
        return log_low - padding, log_high + padding

    def __repr__(self) -> str:
        return f"LanczosSpectrum(ncv={self.ncv}, num_repeats={self.num_repeats})"


def lanczos_spectrum(
    A,
    ncv: int,
    num_repeats: int = 1,
    num_points: int = 1024,
    kappa: float = 3.0,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The spectral density of a symmetric ``A`` by stochastic Lanczos quadrature (Papyan, 2020).

    ``LanczosSpectrum(A, ncv, num_repeats, generator).density(num_points,
    kappa, boundaries, margin)``; see :class:`LanczosSpectrum` and
    :mod:`curvext.linalg.spectrum` for the method and the arguments. Keep a
    :class:`LanczosSpectrum` to try other grids or widths without new products.

    Returns:
        ``(grid [num_points], density [num_points])``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0] * 10 + [5.0] * 10, dtype=torch.float64))
        >>> grid, density = lanczos_spectrum(A, ncv=10, num_repeats=8)
        >>> below_three = grid < 3.0  # the mass near 1: about half, up to the random weights
        >>> 0.3 < torch.trapezoid(density[below_three], grid[below_three]).item() < 0.7
        True
    """
    return LanczosSpectrum(A, ncv, num_repeats, generator).density(
        num_points, kappa, boundaries, margin
    )


def lanczos_log_spectrum(
    A,
    ncv: int,
    num_repeats: int = 1,
    num_points: int = 1024,
    kappa: float = 1.04,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    epsilon: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The eigenvalue density of :math:`\log(|\mathbf{A}| + \epsilon\mathbf{I})` (Papyan,
    2020, C.7).

    ``LanczosSpectrum(A, ncv, num_repeats, generator).log_density(num_points,
    kappa, boundaries, margin, epsilon)``: a log-spaced grid in the units of
    ``A``'s eigenvalues and the density with respect to them; see
    :meth:`LanczosSpectrum.log_density`.

    Returns:
        ``(grid [num_points], density [num_points])``.

    Example:
        >>> A = torch.diag(torch.logspace(-3, 3, 40, dtype=torch.float64))
        >>> grid, density = lanczos_log_spectrum(A, ncv=40, num_repeats=2)
        >>> round(torch.trapezoid(density, grid).item(), 1)  # minus the tails
        1.0
    """
    return LanczosSpectrum(A, ncv, num_repeats, generator).log_density(
        num_points, kappa, boundaries, margin, epsilon
    )


__all__: List[str] = ["LanczosSpectrum", "lanczos_spectrum", "lanczos_log_spectrum"]
