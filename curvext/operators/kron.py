r"""Kronecker-factored curvature (KFAC): block-diagonal over parameters.

The block of parameter :math:`i` is

.. math:: B_i = s_i \, F_{i,1} \otimes \dots \otimes F_{i,k_i} + \sigma_i I

with the factors ``p.kfac`` stored by :class:`~curvext.extensions.KFAC`
(``[G_out, A_in]`` for a weight, ``[G_out]`` for a bias, one factor holding
the whole block for normalisation layers and the generic rule), a scale
:math:`s_i` (from ``c * K``) and an identity term :math:`\sigma_i` (from
``K + δ``). A weight and its bias are separate blocks (curvlinops'
``separate_weight_and_bias=True``; laplace-torch's ``Kron`` keeps them apart
too): the bias block is its own factor ``G_out``, which the weight shares as
its first factor; there is no joint ``[W, b]`` block.

Products never form a Kronecker product: :math:`(A \otimes B)\,\mathrm{vec}(X)
= \mathrm{vec}(A X B^\top)` for row-major ``vec``, applied factor by factor
(the "vec trick"). ``trace``, ``diag``, ``frobenius_norm`` and ``logdet`` come
from the factors (:math:`\det(A \otimes B) = \det(A)^{m}\det(B)^{n}` for
:math:`A` ``n × n``, :math:`B` ``m × m``; with an identity term, from the
factors' eigenvalues).

:meth:`KronOperator.inverse` follows curvlinops' ``KFACInverseLinearOperator``:
factor-wise damping :math:`(A + \delta I)^{-1} \otimes (B + \delta I)^{-1}`,
Martens & Grosse's (2015, §6.3) π-damping, or the exact inverse of
:math:`A \otimes B + \delta I` through the factors' eigendecompositions
(Grosse et al., 2023, eq. 21), which is a :class:`KronEigenOperator`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from curvext.kronecker import (
    SharedFactors,
    dense_kron,
    dense_kron_matrix,
    factor_diagonal,
    factor_eigh,
    factor_size,
    factor_slogdet,
    factor_trace,
    factor_transpose,
    kron_matmat,
)
from curvext.operators.base import (
    CurvatureOperator,
    as_scalar,
    check_damping,
    collect_params,
    combine_slogdets,
    powered,
    stored,
)


def _blockwise(
    operator: CurvatureOperator, matrix: Tensor, apply: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """``apply(index, rows)`` on each parameter's row block of ``matrix``, stacked."""
    blocks = matrix.split(operator._numels)
    return torch.cat([apply(index, block) for index, block in enumerate(blocks)])


def _cached(cache: dict, key, compute: Callable[[], object]):
    """``compute()``, once per ``key`` in ``cache`` (one call of an operator
    method): the key of a shared factor (:class:`~curvext.kronecker.SharedFactors`)
    makes it decomposed or inverted once for every block holding it."""
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _eigen_slogdet(eigenvalues: Tensor) -> Tuple[Tensor, Tensor]:
    return eigenvalues.sign().prod(), eigenvalues.abs().log().sum()


def _spread_scale(factor_values: Sequence[Tensor], scale) -> List[Tensor]:
    """``scale * ⊗ values`` as scaled factors: ``scale^(1/k)`` each, or all on the first if
    negative."""
    if scale >= 0:
        return [values * scale ** (1.0 / len(factor_values)) for values in factor_values]
    first, *rest = factor_values
    return [first * scale, *rest]


def _where(operator: CurvatureOperator, index: int) -> str:
    return f"block {index} (parameter shape {tuple(operator.params[index].shape)})"


def _singular_error(owner: str, where: str, damping: float) -> ValueError:
    return ValueError(f"{owner}.inverse(damping={damping}): {where} is singular; pass damping > 0.")


def conditioning_limit(size: int, damping: float) -> float:
    """Factor of ``eps · λ_max`` below which a damped eigenvalue is noise.

    Undamped, NumPy's rank threshold ``size``: computed eigenvalues of a
    rank-deficient matrix scatter around zero by up to ``size · eps · λ_max``.
    Damped, the damping itself is exact and the eigenvalues' rounding error
    is about ``eps · λ_max`` (measured in float32 at size 1025: 7e-6 for
    ``λ_max`` 57, -3.4e-5 for ``λ_max`` 165), so only a damped eigenvalue
    below ``2 eps λ_max`` is noise; above it, ``δ = 1e-4`` still inverts the
    second factor to 1.4 % of float64.
    """
    return float(size) if damping == 0 else 2.0


def check_conditioned(values: Tensor, size: int, owner: str, where: str, damping: float) -> None:
    r"""Raise unless a block with (damped) eigenvalues ``values`` is safely invertible.

    An eigenvalue below ``conditioning_limit(...) · eps · λ_max`` is rounding
    noise (type-2 KFAC of one sample is rank-deficient, say), and inverting
    it returns values of ``1/eps`` and more instead of an error.

    Args:
        values: The (damped) eigenvalues of the block.
        size: The size of the matrices they were computed from.
        owner: ``"KronOperator"``, ...
        where: Which block, for the message.
        damping: The damping asked for, for the message.
    """
    magnitudes = values.abs()
    largest = magnitudes.max()
    if not bool(largest > 0):
        raise _singular_error(owner, where, damping)
    eps = torch.finfo(values.dtype).eps
    limit = conditioning_limit(size, damping) * eps * largest
    if bool((magnitudes <= limit).any()):
        smallest = magnitudes.min().item()
        least = 2 * eps * largest.item()
        suggested = max(100 * least, 1e-3 * largest.item())
        raise ValueError(
            f"{owner}.inverse(damping={damping}): {where} is singular (numerically, in "
            f"{str(values.dtype).replace('torch.', '')}): its smallest eigenvalue "
            f"{smallest:.3g} is below the rounding error {limit.item():.3g} of its "
            f"eigenvalues (largest {largest.item():.3g}), so its inverse would be noise. "
            f"Pass a damping well above {least:.3g} (e.g. damping={suggested:.3g}, "
            "1e-3·λ_max)."
        )


class KronOperator(CurvatureOperator):
    r"""Block-diagonal :math:`\bigoplus_i (s_i \bigotimes_j F_{ij} + \sigma_i I)`.

    Args:
        params: The parameters (order = order of the blocks).
        factors: One list of square factors per parameter whose sizes
            multiply to the parameter's number of entries
            (``torch.kron(*factors)`` is the block w.r.t. ``p.flatten()``); a
            1-D factor is the diagonal of a diagonal factor (``Embedding``'s
            input factor), never made dense.
        scales: :math:`s_i` per block (default 1).
        shifts: :math:`\sigma_i` per block (default 0).

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> A, G = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.eye(2)
        >>> K = KronOperator(list(layer.parameters()), [[G, A], [G]])
        >>> K.shape, K.trace().item(), K.det().item()
        ((6, 6), 8.0, 4.0)
        >>> (K.inverse() @ torch.ones(6)).round(decimals=4).tolist()
        [0.5, 1.0, 0.5, 1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        factors: Sequence[Sequence[Tensor]],
        scales: Optional[Sequence[float]] = None,
        shifts: Optional[Sequence[float]] = None,
    ):
        params = list(params)
        factors = [list(block) for block in factors]
        if len(factors) != len(params) or not params:
            raise ValueError(
                f"KronOperator: expected one list of factors per parameter "
                f"({len(params)} parameters), got {len(factors)}."
            )
        for index, (param, block) in enumerate(zip(params, factors)):
            square = all(f.ndim == 1 or (f.ndim == 2 and f.shape[0] == f.shape[1]) for f in block)
            if not block or not square or math.prod(f.shape[0] for f in block) != param.numel():
                raise ValueError(
                    f"KronOperator: the factors of parameter {index} (shape "
                    f"{tuple(param.shape)}, {param.numel()} entries) have shapes "
                    f"{[tuple(f.shape) for f in block]}; expected square factors (or "
                    f"1-D diagonals) whose sizes multiply to {param.numel()}."
                )
        super().__init__(params, factors[0][0].dtype, factors[0][0].device)
        self.factors = factors
        #: Which factors are one tensor held by several blocks (a weight's
        #: and its bias's ``G``): decomposed, inverted and π-damped once.
        self.shared = SharedFactors(factors)
        self.scales = [1.0] * len(params) if scales is None else [float(s) for s in scales]
        self.shifts = [0.0] * len(params) if shifts is None else [float(s) for s in shifts]

    @classmethod
    def from_params(cls, params: Iterable[Tensor]) -> "KronOperator":
        """The Kronecker factors ``p.kfac`` stored on each trainable parameter.

        Args:
            params: Parameters, e.g. ``model.parameters()``; those with
                ``requires_grad=False`` are skipped.

        Raises:
            AttributeError: If a parameter has no ``p.kfac`` (run ``KFAC()``).
            ValueError: If the factors do not fit the parameter.

        Example:
            >>> from curvext import backpack, extend
            >>> from curvext.extensions import KFAC
            >>> model = extend(torch.nn.Linear(3, 2))
            >>> loss_fn = extend(torch.nn.MSELoss())
            >>> loss = loss_fn(model(torch.randn(5, 3)), torch.randn(5, 2))
            >>> with backpack(KFAC(fisher_type="type-2")):
            ...     loss.backward()
            >>> K = KronOperator.from_params(model.parameters())
            >>> K_inv = K.inverse(damping=1e-3, use_heuristic_damping=True)
            >>> K.shape, (K_inv @ torch.ones(8)).shape
            ((8, 8), torch.Size([8]))
        """
        params = collect_params(params, f"{cls.__name__}.from_params")
        detached: dict = {}  # one detached tensor per stored one: a shared G stays shared
        factors = [
            [
                detached.setdefault(id(f), f.detach())
                for f in stored(p, index, "kfac", f"{cls.__name__}.from_params")
            ]
            for index, p in enumerate(params)
        ]
        return cls(params, factors)

    @classmethod
    def from_data(
        cls,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        data: Iterable,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        progressbar: bool = False,
        params: Optional[Iterable[Tensor]] = None,
        distributed=None,
    ) -> "KronOperator":
        r"""KFAC of a whole data set, one backward pass per batch.

        Runs ``KFAC(fisher_type, mc_samples, kfac_approx)`` on every batch and
        combines the factors as one batch of the whole set would give them:
        with :math:`d_b` the loss denominator of batch :math:`b` (``1/c_b``;
        :math:`N_b` for ``CrossEntropyLoss``) and :math:`N_b` its samples,

        .. math:: G = \frac{\sum_b d_b G_b}{\sum_b d_b} \ (\text{mean}),
            \quad G = \sum_b G_b \ (\text{sum}), \qquad
            A = \frac{\sum_b N_b A_b}{\sum_b N_b},

        because :math:`G_b` is :math:`c_b` times a sum over the batch and
        :math:`A_b` an average over it (derivation: :mod:`curvext.operators.data`).
        One-factor blocks (biases, normalisation layers) combine like
        :math:`G`; for ``"forward-only"`` every factor combines like
        :math:`A`. Exact for ``"type-2"``, ``"empirical"`` and
        ``"forward-only"``; for ``"mc"`` in expectation (fresh samples per batch).

        Args:
            model: The model, extended in place with :func:`curvext.extend`
                if it is not yet.
            loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
                with ``reduction="mean"`` or ``"sum"`` (extended likewise).
            data: Any iterable of ``(X, y)`` batches (a ``DataLoader``), on the
                model's device and dtype. ``kfac_approx="expand"`` needs the
                same number of positions per sample in every batch.
            fisher_type: ``"type-2"`` (default), ``"mc"``, ``"empirical"`` or
                ``"forward-only"`` (see :class:`~curvext.extensions.KFAC`).
            mc_samples: Monte-Carlo samples per batch for ``"mc"``.
            kfac_approx: ``"expand"`` (default) or ``"reduce"``.
            progressbar: Show a ``tqdm`` progress bar over the batches.
            params: The parameters, in block order (default: the model's
                trainable parameters).
            distributed: ``None`` (default): if a :mod:`torch.distributed`
                process group is initialised, ``data`` is this rank's shard and
                the factors are summed over the ranks (every rank gets the
                KFAC of the whole data set); ``False``: this rank's data only;
                ``True``: require a group; or a ``ProcessGroup`` (see
                :mod:`curvext.distributed` and ``docs/distributed.md``).

        Each batch's graph is freed by its backward pass; the parameters'
        ``.grad`` and ``p.kfac`` are left as they were before the call.

        Raises:
            ValueError: For an empty ``data``, a batch that is not ``(X, y)``,
                a loss reduction other than ``"mean"``/``"sum"``, or invalid
                ``KFAC`` arguments.
            ImportError: If ``progressbar=True`` and ``tqdm`` is missing.

        Example:
            >>> model = torch.nn.Sequential(
            ...     torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
            ... )
            >>> loss_fn = torch.nn.CrossEntropyLoss()
            >>> X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
            >>> batches = [(X[:4], y[:4]), (X[4:], y[4:])]
            >>> K = KronOperator.from_data(model, loss_fn, batches)
            >>> K_full = KronOperator.from_data(model, loss_fn, [(X, y)])
            >>> K.shape, torch.allclose(K.to_dense(), K_full.to_dense())
            ((26, 26), True)
        """
        from curvext.extensions.data_pass import KFACForData
        from curvext.operators.data import accumulate_over_data

        extension = KFACForData(fisher_type, mc_samples, kfac_approx)
        params, factors = accumulate_over_data(
            model,
            loss_fn,
            data,
            extension,
            params,
            progressbar,
            f"{cls.__name__}.from_data",
            distributed,
        )
        return cls(params, factors)

    def _scaled_factors(self, index: int) -> List[Tensor]:
        """The factors of block ``index`` with its scale folded into the first.

        With scale 1 these are the stored tensors themselves, so that a factor
        shared by two blocks (a weight's ``G`` and its bias's) stays one object.
        """
        first, *rest = self.factors[index]
        scale = self.scales[index]
        return [first if scale == 1.0 else first * scale, *rest]

    def _eigenvalues(
        self, index: int, decompositions: Optional[dict] = None
    ) -> Tuple[List[Tensor], Tensor]:
        """Eigenvectors of the factors and the eigenvalues of block ``index``, flat.

        ``decompositions`` (shared-factor key -> ``eigh``) shares the
        decomposition of a factor that several blocks hold.
        """
        decompositions = {} if decompositions is None else decompositions
        eighs = [
            _cached(decompositions, self.shared.key(index, slot), lambda f=f: factor_eigh(f))
            for slot, f in enumerate(self.factors[index])
        ]
        values = dense_kron([values for values, _ in eighs])
        values = values * self.scales[index] + self.shifts[index]
        return [vectors for _, vectors in eighs], values

    def _matmat(self, matrix: Tensor) -> Tensor:
        def apply(index, block):
            product = kron_matmat(self.factors[index], block)
            if self.scales[index] != 1.0:
                product = product * self.scales[index]
            if self.shifts[index] != 0.0:
                product = product + self.shifts[index] * block
            return product

        return _blockwise(self, matrix, apply)

    def to_dense(self) -> Tensor:
        return torch.block_diag(
            *[
                dense_kron_matrix(block) * scale
                + shift * torch.eye(p.numel(), dtype=self.dtype, device=self.device)
                for block, scale, shift, p in zip(
                    self.factors, self.scales, self.shifts, self.params
                )
            ]
        )

    def diag(self) -> Tensor:
        return torch.cat(
            [
                dense_kron([factor_diagonal(f) for f in block]) * scale + shift
                for block, scale, shift in zip(self.factors, self.scales, self.shifts)
            ]
        )

    def _slogdet(self) -> Tuple[Tensor, Tensor]:
        signs, logabsdets, decompositions = [], [], {}
        for index, (block, scale, shift) in enumerate(zip(self.factors, self.scales, self.shifts)):
            if shift != 0.0:
                values = self._eigenvalues(index, decompositions)[1]
                sign, logabsdet = _eigen_slogdet(values)
            else:
                size = self._numels[index]
                as_tensor = functools.partial(torch.tensor, dtype=self.dtype, device=self.device)
                sign = as_tensor(math.copysign(1.0, scale) if scale else 0.0) ** size
                logabsdet = as_tensor(size * math.log(abs(scale)) if scale else -math.inf)
                for factor in block:
                    # det(A ⊗ B) = det(A)^m det(B)^n for A n×n, B m×m
                    power = size // factor.shape[0]
                    factor_sign, factor_logabsdet = factor_slogdet(factor)
                    sign = sign * factor_sign**power
                    logabsdet = logabsdet + power * factor_logabsdet
            signs.append(sign)
            logabsdets.append(logabsdet)
        return combine_slogdets(signs, logabsdets)

    def frobenius_norm(self) -> Tensor:
        # ||s X + σ I||² = s²||X||² + 2 s σ tr(X) + σ² d,
        # ||⊗F||² = Π||F||², tr(⊗F) = Π tr F
        squares = [
            scale**2 * torch.stack([f.square().sum() for f in block]).prod()
            + 2 * scale * shift * torch.stack([factor_trace(f) for f in block]).prod()
            + shift**2 * size
            for block, scale, shift, size in zip(
                self.factors, self.scales, self.shifts, self._numels
            )
        ]
        return torch.stack(squares).sum().clamp_min(0).sqrt()

    def _add_scalar(self, value: float) -> "KronOperator":
        return KronOperator(
            self.params, self.factors, self.scales, [s + value for s in self.shifts]
        )

    def _scale(self, value: float) -> "KronOperator":
        return KronOperator(
            self.params,
            self.factors,
            [s * value for s in self.scales],
            [s * value for s in self.shifts],
        )

    def _add_same(self, other: "KronOperator") -> "KronOperator":
        """Exact sum: in each block all factors but at most one must agree."""
        factors, scales = [], []
        sums: dict = {}  # a shared factor's sum is computed once and stays shared
        for index, (mine, theirs) in enumerate(zip(self.factors, other.factors)):
            if [f.shape for f in mine] != [f.shape for f in theirs]:
                raise ValueError(
                    f"Cannot add KronOperators: {_where(self, index)} has factors "
                    f"{[tuple(f.shape) for f in mine]} vs {[tuple(f.shape) for f in theirs]}."
                )
            differ = [j for j, (a, b) in enumerate(zip(mine, theirs)) if not torch.equal(a, b)]
            s_mine, s_theirs = self.scales[index], other.scales[index]
            if not differ:
                factors.append(list(mine))
                scales.append(s_mine + s_theirs)
            elif len(differ) == 1:
                j = differ[0]
                summed = list(mine)
                key = (self.shared.key(index, j), other.shared.key(index, j), s_mine, s_theirs)
                if key not in sums:
                    sums[key] = s_mine * mine[j] + s_theirs * theirs[j]
                summed[j] = sums[key]
                factors.append(summed)
                scales.append(1.0)
            else:
                raise ValueError(
                    f"Cannot add KronOperators: in {_where(self, index)} the factors "
                    f"differ in {len(differ)} positions, and a sum of Kronecker products "
                    f"is a Kronecker product only if all factors but one agree. Use "
                    f"to_dense(), or add the factors yourself (a KFAC-style average)."
                )
        shifts = [a + b for a, b in zip(self.shifts, other.shifts)]
        return KronOperator(self.params, factors, scales, shifts)

    def _factor_dampings(
        self,
        index: int,
        damping: float,
        use_heuristic_damping: bool,
        min_damping: float,
    ) -> List[float]:
        r"""The damping of each factor of block ``index``.

        π-damping (Martens & Grosse, 2015, §6.3): with :math:`m_j` the mean
        eigenvalue ``tr(F_j) / dim F_j``, factor :math:`j` of :math:`k` gets
        :math:`\max(\delta^{1/k} m_j / (\prod_i m_i)^{1/k}, \text{min\_damping})`,
        i.e. :math:`\pi\sqrt\delta` and :math:`\sqrt\delta/\pi` with
        :math:`\pi = \sqrt{m_A/m_B}` for two factors. Blocks with a mean
        eigenvalue ``<= 0`` get plain ``damping``. A one-factor block whose
        factor is also a factor of another block (a bias and its weight share
        the output-side factor ``G``: the bias is the weight's column for a
        constant input) gets that factor's π-damping there, as in curvlinops;
        other one-factor blocks get plain ``damping``.
        """
        factors = self._scaled_factors(index)
        count = len(factors)
        if use_heuristic_damping and count == 1:
            for other, position in self.shared.holders(index, 0):
                if len(self.factors[other]) >= 2 and self.scales[other] == self.scales[index]:
                    dampings = self._factor_dampings(
                        other, damping, use_heuristic_damping, min_damping
                    )
                    return [dampings[position]]
        if use_heuristic_damping and count >= 2:
            means = [(factor_trace(f) / factor_size(f)).item() for f in factors]
            if all(m > 0 for m in means):
                geometric_mean = math.prod(means) ** (1.0 / count)
                root = damping ** (1.0 / count)
                return [max(root * m / geometric_mean, min_damping) for m in means]
        return [damping] * count

    def inverse(
        self,
        damping: float = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
    ) -> CurvatureOperator:
        r"""Damped inverse, with curvlinops' ``KFACInverseLinearOperator`` semantics.

        For a block :math:`A \otimes B`:

        - default: :math:`(A + \delta I)^{-1} \otimes (B + \delta I)^{-1}`
          (one-factor blocks: :math:`(A + \delta I)^{-1}`), a :class:`KronOperator`;
        - ``use_heuristic_damping=True``: :math:`(A + \delta_A I)^{-1} \otimes
          (B + \delta_B I)^{-1}` with :math:`\delta_A = \max(\pi\sqrt\delta,
          \text{min\_damping})`, :math:`\delta_B = \max(\sqrt\delta/\pi,
          \text{min\_damping})`, :math:`\pi = \sqrt{(\mathrm{tr}A/\dim A) /
          (\mathrm{tr}B/\dim B)}` (Martens & Grosse, 2015, §6.3; a bias gets
          its weight's damping of their shared factor, as in curvlinops, other
          one-factor blocks plain :math:`\delta`), a :class:`KronOperator`;
        - ``use_exact_damping=True``: :math:`(A \otimes B + \delta I)^{-1} =
          (Q_A \otimes Q_B)(\Lambda_A \otimes \Lambda_B + \delta I)^{-1}
          (Q_A \otimes Q_B)^\top` from the eigendecompositions of the factors,
          a :class:`KronEigenOperator`.

        An operator with an identity term (``K + σ``) is not a Kronecker
        product, so it is always inverted exactly (eigendecompositions), with
        ``damping`` added to σ; factor-wise damping (``damping > 0`` without
        ``use_exact_damping``, or the heuristic) is refused for it.

        Args:
            damping: :math:`\delta \ge 0`. Default ``0``: the exact inverse.
            use_heuristic_damping: π-damping (see above). Default ``False``.
            min_damping: Lower bound of the π-damped values. Default ``1e-8``.
            use_exact_damping: Invert :math:`A \otimes B + \delta I` exactly.
                Default ``False``.

        Raises:
            ValueError: For a negative or non-finite ``damping``/``min_damping``,
                both ``use_heuristic_damping`` and ``use_exact_damping``,
                factor-wise damping of an operator with an identity term, or a
                (damped) block that is singular or numerically singular
                (:func:`check_conditioned`).

        Example:
            >>> layer = torch.nn.Linear(2, 2, bias=False)
            >>> A, G = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.eye(2)
            >>> K = KronOperator([layer.weight], [[G, A]])
            >>> factorwise = K.inverse(damping=1.0)  # (G + I)⁻¹ ⊗ (A + I)⁻¹
            >>> (factorwise @ torch.ones(4)).round(decimals=4).tolist()
            [0.125, 0.25, 0.125, 0.25]
            >>> exact = K.inverse(damping=1.0, use_exact_damping=True)  # (G ⊗ A + I)⁻¹
            >>> (exact @ torch.ones(4)).round(decimals=4).tolist()
            [0.25, 0.5, 0.25, 0.5]
        """
        damping = check_damping(damping)
        min_damping = check_damping(min_damping, "min_damping")
        if use_heuristic_damping and use_exact_damping:
            raise ValueError(
                "KronOperator.inverse: use either use_heuristic_damping or "
                "use_exact_damping, not both."
            )
        shifted = any(s != 0.0 for s in self.shifts)
        if shifted and (use_heuristic_damping or (damping > 0 and not use_exact_damping)):
            raise ValueError(
                "KronOperator.inverse: this operator has an identity term (K + σ), "
                "so it is not a Kronecker product and factor-wise damping is "
                "undefined; pass use_exact_damping=True (or add the damping first: "
                "(K + δ).inverse())."
            )
        if use_exact_damping or shifted:
            return self._exact_inverse(damping)
        inverses, cache = [], {}
        for index in range(len(self.params)):
            dampings = self._factor_dampings(index, damping, use_heuristic_damping, min_damping)
            inverses.append(
                [
                    _cached(
                        cache,
                        # the first factor carries the block's scale
                        (self.shared.key(index, slot), self.scales[index] if slot == 0 else 1.0, d),
                        lambda f=factor, d=d: self._inverse_factor(f, d, index),
                    )
                    for slot, (factor, d) in enumerate(zip(self._scaled_factors(index), dampings))
                ]
            )
        return KronOperator(self.params, inverses)

    def _inverse_factor(self, factor: Tensor, damping: float, index: int) -> Tensor:
        """``(factor + damping I)⁻¹``: Cholesky when positive definite, LU
        otherwise; a diagonal (1-D) factor entrywise."""
        size = factor.shape[0]
        if factor.dim() == 1:
            damped = factor + damping
            check_conditioned(
                damped, 1, "KronOperator", f"a factor of {_where(self, index)}", damping
            )
            return damped.reciprocal()
        damped = factor + damping * torch.eye(size, dtype=factor.dtype, device=factor.device)
        # λ_min >= δ and λ_max <= trace for a positive semi-definite factor: only
        # a damping below the limit for λ_max = trace needs the eigenvalues
        trace = float(factor.diagonal().sum())
        limit = conditioning_limit(size, damping) * torch.finfo(factor.dtype).eps
        if damping <= limit * abs(trace) or trace < 0:
            check_conditioned(
                torch.linalg.eigvalsh(damped),
                size,
                "KronOperator",
                f"a factor of {_where(self, index)}",
                damping,
            )
        cholesky, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            return torch.cholesky_inverse(cholesky)
        inverse, info = torch.linalg.inv_ex(damped)
        if info.item() != 0:
            raise _singular_error("KronOperator", f"a factor of {_where(self, index)}", damping)
        return inverse

    def decompose(self, damping: bool = False) -> "KronDecomposed":
        r"""The eigendecomposed operator, laplace-torch's ``Kron.decompose``.

        Each factor is eigendecomposed once; a scale :math:`s` of the block
        is spread over its :math:`k` factors as :math:`s^{1/k}` (laplace-torch's
        ``Kron * s``; for :math:`s < 0`, without ``damping``, it goes to the
        first factor) and an identity term :math:`\sigma` (``K + σ``) becomes
        the block's delta.

        Args:
            damping: laplace-torch's damped variant (see :class:`KronDecomposed`).

        Raises:
            ValueError: With ``damping=True``, for an identity term or a
                negative scale, which the damped form cannot hold.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(2, 2))
            >>> K = KronOperator([w], [[torch.diag(torch.tensor([1.0, 2])), torch.eye(2)]])
            >>> D = K.decompose() + 1.0  # a prior precision
            >>> D.logdet().item() == torch.tensor([2.0, 2, 3, 3]).log().sum().item()
            True
        """
        eigenvectors, eigenvalues, cache = [], [], {}
        for index, block in enumerate(self.factors):
            if damping and (self.shifts[index] != 0.0 or self.scales[index] < 0):
                raise ValueError(
                    f"KronOperator.decompose(damping=True): {_where(self, index)} has "
                    f"an identity term or a negative scale, which the damped form "
                    f"(A + √δ) ⊗ (B + √δ) cannot hold; decompose K before adding "
                    f"damping, or use damping=False."
                )
            decompositions = [
                _cached(cache, self.shared.key(index, slot), lambda f=f: factor_eigh(f))
                for slot, f in enumerate(block)
            ]
            eigenvectors.append([vectors for _, vectors in decompositions])
            eigenvalues.append(
                _spread_scale([values for values, _ in decompositions], self.scales[index])
            )
        deltas = torch.tensor(self.shifts, dtype=self.dtype, device=self.device)
        return KronDecomposed(self.params, eigenvectors, eigenvalues, deltas, damping)

    def _exact_inverse(self, damping: float) -> "KronEigenOperator":
        eigenvectors, eigenvalues, decompositions = [], [], {}
        for index in range(len(self.params)):
            vectors, values = self._eigenvalues(index, decompositions)
            values = values + damping
            size = sum(vector.shape[0] for vector in vectors)
            check_conditioned(values, size, "KronOperator", _where(self, index), damping)
            eigenvectors.append(vectors)
            eigenvalues.append(values.reciprocal())
        return KronEigenOperator(self.params, eigenvectors, eigenvalues)


class KronEigenOperator(CurvatureOperator):
    r"""Block-diagonal in a Kronecker eigenbasis: :math:`\bigoplus_i Q_i \Lambda_i Q_i^\top`.

    :math:`Q_i = Q_{i,1} \otimes \dots \otimes Q_{i,k}` (orthogonal factors) and
    :math:`\Lambda_i` any diagonal. What :meth:`KronOperator.inverse` returns
    with exact damping.

    Args:
        params: The parameters (order = order of the blocks).
        eigenvectors: Per block, the orthogonal factors :math:`Q_{i,j}` (a
            1-D factor is diagonal: the identity, as ones, for a diagonal
            factor's eigenvectors).
        eigenvalues: Per block, the diagonal of :math:`\Lambda_i`, flat
            (row-major over the factors' axes, as ``torch.kron`` orders them).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2, 2))
        >>> eigenvalues = torch.tensor([1.0, 3.0, 7.0, 15.0])
        >>> E = KronEigenOperator([p], [[torch.eye(2), torch.eye(2)]], [eigenvalues])
        >>> E.diag().tolist(), E.trace().item(), E.inverse(damping=1.0).diag().tolist()
        ([1.0, 3.0, 7.0, 15.0], 26.0, [0.5, 0.25, 0.125, 0.0625])
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Tensor],
    ):
        params = list(params)
        if not (len(params) == len(eigenvectors) == len(eigenvalues)) or not params:
            raise ValueError(
                f"KronEigenOperator: expected one list of eigenvectors and one "
                f"eigenvalue vector per parameter ({len(params)} parameters), got "
                f"{len(eigenvectors)} and {len(eigenvalues)}."
            )
        for index, (param, vectors, values) in enumerate(zip(params, eigenvectors, eigenvalues)):
            size = math.prod(q.shape[0] for q in vectors)
            if size != param.numel() or values.shape != (param.numel(),):
                raise ValueError(
                    f"KronEigenOperator: parameter {index} (shape {tuple(param.shape)}) "
                    f"got eigenvector factors {[tuple(q.shape) for q in vectors]} and "
                    f"eigenvalues {tuple(values.shape)}; expected sizes multiplying "
                    f"to {param.numel()} and eigenvalues ({param.numel()},)."
                )
        super().__init__(params, eigenvalues[0].dtype, eigenvalues[0].device)
        self.eigenvectors = [list(vectors) for vectors in eigenvectors]
        self.eigenvalues = list(eigenvalues)

    def _matmat(self, matrix: Tensor) -> Tensor:
        def apply(index, block):
            vectors = self.eigenvectors[index]
            rotated = kron_matmat([factor_transpose(q) for q in vectors], block)
            return kron_matmat(vectors, self.eigenvalues[index].unsqueeze(1) * rotated)

        return _blockwise(self, matrix, apply)

    def to_dense(self) -> Tensor:
        blocks = []
        for vectors, values in zip(self.eigenvectors, self.eigenvalues):
            basis = dense_kron_matrix(vectors)
            blocks.append(basis @ torch.diag(values) @ basis.T)
        return torch.block_diag(*blocks)

    def diag(self) -> Tensor:
        # diag(Q Λ Qᵀ)_a = Σ_m Q_am² λ_m, and (⊗Q)∘(⊗Q) = ⊗(Q∘Q)
        return torch.cat(
            [
                kron_matmat([q.square() for q in vectors], values.unsqueeze(1)).squeeze(1)
                for vectors, values in zip(self.eigenvectors, self.eigenvalues)
            ]
        )

    def _slogdet(self) -> Tuple[Tensor, Tensor]:
        return _eigen_slogdet(torch.cat(self.eigenvalues))

    def frobenius_norm(self) -> Tensor:
        return torch.cat(self.eigenvalues).norm()

    def _with_eigenvalues(self, eigenvalues: List[Tensor]) -> "KronEigenOperator":
        return KronEigenOperator(self.params, self.eigenvectors, eigenvalues)

    def _add_scalar(self, value: float) -> "KronEigenOperator":
        return self._with_eigenvalues([v + value for v in self.eigenvalues])

    def _scale(self, value: float) -> "KronEigenOperator":
        return self._with_eigenvalues([v * value for v in self.eigenvalues])

    def _add_same(self, other: "KronEigenOperator") -> "KronEigenOperator":
        for index, (mine, theirs) in enumerate(zip(self.eigenvectors, other.eigenvectors)):
            same = len(mine) == len(theirs) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs)
            )
            if not same:
                raise ValueError(
                    f"Cannot add KronEigenOperators: {_where(self, index)} has a "
                    f"different eigenbasis in each; the sum is only structured in a "
                    f"shared basis."
                )
        return self._with_eigenvalues([a + b for a, b in zip(self.eigenvalues, other.eigenvalues)])

    def inverse(self, damping: float = 0.0) -> "KronEigenOperator":
        r""":math:`\bigoplus_i Q_i (\Lambda_i + \delta I)^{-1} Q_i^\top`.

        Raises:
            ValueError: For a negative or non-finite ``damping``, or a damped
                eigenvalue below rounding (:func:`check_conditioned`).
        """
        damping = check_damping(damping)
        inverses = []
        for index, values in enumerate(self.eigenvalues):
            damped = values + damping
            size = sum(vector.shape[0] for vector in self.eigenvectors[index])
            check_conditioned(damped, size, type(self).__name__, _where(self, index), damping)
            inverses.append(damped.reciprocal())
        return self._with_eigenvalues(inverses)


DeltasLike = Union[float, Tensor]


class KronDecomposed(KronEigenOperator):
    r"""laplace-torch's ``KronDecomposed``: eigendecomposed Kronecker blocks plus deltas.

    Block :math:`i`, with factors :math:`F_{ij} = Q_{ij} \mathrm{diag}(l_{ij})
    Q_{ij}^\top` (:math:`j = 1 \dots k`) and delta :math:`\delta_i` (e.g. a
    prior precision), is :math:`Q_i \Lambda_i Q_i^\top` with
    :math:`Q_i = \bigotimes_j Q_{ij}` and

    - :math:`\Lambda_i = \bigotimes_j l_{ij} + \delta_i`, i.e. the block
      :math:`\bigotimes_j F_{ij} + \delta_i I` (default);
    - :math:`\Lambda_i = \bigotimes_j (l_{ij} + \delta_i^{1/k})` with
      ``damping=True`` (laplace-torch's damped variant,
      :math:`(A + \sqrt\delta I) \otimes (B + \sqrt\delta I)` for two factors,
      :math:`A + \delta I` for one).

    Everything raises the eigenvalues to a power: ``bmm(W, exponent)``
    :math:`= B^{\text{exponent}} W`, ``diag(exponent)``, ``to_matrix(exponent)``;
    ``logdet()`` is :math:`\sum \log \Lambda` and stays differentiable in the
    deltas. It is a :class:`KronEigenOperator` (``eigenvalues`` holds the
    flat :math:`\Lambda_i`, ``factor_eigenvalues`` the :math:`l_{ij}`), so the
    whole operator interface applies, with laplace-torch's meaning of ``+``:
    ``D + deltas`` adds a scalar or one delta per block (a tensor) to
    ``deltas``; without ``damping`` that is ``D + δ I``, with it the damped
    mixing above. ``c * D`` is :math:`c` times the operator (laplace-torch
    scales only the Kronecker part; the two agree for zero deltas); with
    ``damping`` it needs :math:`c > 0`.

    Differences from laplace-torch: ``+`` keeps ``damping`` (laplace-torch's
    ``+`` returns an undamped ``KronDecomposed``, so its damped variant takes
    its deltas through the constructor), ``bmm`` returns ``W``'s shape
    (laplace-torch squeezes it), any number of factors per block, errors for
    bad shapes and singular powers instead of NaN.

    Args:
        params: The parameters (order = order of the blocks).
        eigenvectors: Per block, the eigenvectors :math:`Q_{ij}` of its factors.
        eigenvalues: Per block, the eigenvalues :math:`l_{ij}` of its factors.
        deltas: A scalar, or one delta per block (``[len(params)]``). Default 0.
        damping: The damped variant. Default ``False``.

    Raises:
        ValueError: For eigenvectors and eigenvalues that do not fit the
            parameters, deltas of another length, non-finite deltas, or (with
            ``damping``) negative ones.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2, 2))
        >>> Q, l = [torch.eye(2), torch.eye(2)], [torch.tensor([1.0, 3]), torch.tensor([1.0, 2])]
        >>> D = KronDecomposed([w], [Q], [l], deltas=1.0)
        >>> D.diag()
        tensor([2., 3., 4., 7.])
        >>> D.diag(exponent=-1)
        tensor([0.5000, 0.3333, 0.2500, 0.1429])
        >>> D.bmm(torch.ones(1, 1, 4), exponent=1).tolist()
        [[[2.0, 3.0, 4.0, 7.0]]]
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: Optional[DeltasLike] = None,
        damping: bool = False,
    ):
        params = list(params)
        eigenvalues = [list(values) for values in eigenvalues]
        eigenvectors = [list(vectors) for vectors in eigenvectors]
        if len(eigenvalues) != len(params) or len(eigenvectors) != len(params):
            raise ValueError(
                f"KronDecomposed: expected one list of factor eigenvectors and one of "
                f"factor eigenvalues per parameter ({len(params)} parameters), got "
                f"{len(eigenvectors)} and {len(eigenvalues)}."
            )
        for index, (vectors, values) in enumerate(zip(eigenvectors, eigenvalues)):
            fits = len(vectors) == len(values) and all(
                tuple(q.shape) in ((len(lam), len(lam)), (len(lam),))
                for q, lam in zip(vectors, values)
            )
            if not fits:
                raise ValueError(
                    f"KronDecomposed: block {index} has eigenvectors "
                    f"{[tuple(q.shape) for q in vectors]} for eigenvalues "
                    f"{[tuple(lam.shape) for lam in values]}; expected one square "
                    f"[n, n] (or [n], a diagonal basis) per flat [n]."
                )
        reference = eigenvectors[0][0] if eigenvectors and eigenvectors[0] else None
        self.factor_eigenvalues = eigenvalues
        self.damping = bool(damping)
        self.deltas = self._as_deltas(deltas, len(params), reference)
        super().__init__(params, eigenvectors, self._block_eigenvalues())

    def _as_deltas(self, deltas, count: int, reference: Optional[Tensor]) -> Tensor:
        """``deltas`` as a tensor ``[count]`` (keeping its autograd graph)."""
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        device = reference.device if reference is not None else None
        if deltas is None:
            return torch.zeros(count, dtype=dtype, device=device)
        if not isinstance(deltas, Tensor):
            deltas = torch.tensor(as_scalar(deltas, "KronDecomposed: deltas"))
        deltas = deltas.to(dtype=dtype, device=device)
        if not (deltas.ndim == 0 or (deltas.ndim == 1 and len(deltas) in (1, count))):
            raise ValueError(
                f"KronDecomposed: deltas must be a scalar or have one entry per "
                f"block ({count}), got shape {list(deltas.shape)}."
            )
        if not torch.isfinite(deltas).all():
            raise ValueError(f"KronDecomposed: deltas must be finite, got {deltas}.")
        if self.damping and (deltas < 0).any():
            raise ValueError(
                f"KronDecomposed(damping=True): deltas must be >= 0 (their roots "
                f"damp the factors), got {deltas}."
            )
        return deltas.expand(count)

    def _block_eigenvalues(self) -> List[Tensor]:
        r"""The flat :math:`\Lambda_i` of every block, from factors and deltas."""
        blocks = []
        for values, delta in zip(self.factor_eigenvalues, self.deltas):
            if self.damping:
                root = delta ** (1.0 / len(values))
                blocks.append(dense_kron([lam + root for lam in values]))
            else:
                blocks.append(dense_kron(values) + delta)
        return blocks

    def _with(self, **changes) -> "KronDecomposed":
        arguments = dict(
            params=self.params,
            eigenvectors=self.eigenvectors,
            eigenvalues=self.factor_eigenvalues,
            deltas=self.deltas,
            damping=self.damping,
        )
        arguments.update(changes)
        return KronDecomposed(**arguments)

    def _with_eigenvalues(self, eigenvalues: List[Tensor]) -> KronEigenOperator:
        # another spectrum in the same basis is no longer factor eigenvalues + deltas
        return KronEigenOperator(self.params, self.eigenvectors, eigenvalues)

    def _powered(self, exponent: float) -> KronEigenOperator:
        """The operator to the power ``exponent``, in the same eigenbasis."""
        return self._with_eigenvalues(
            [
                powered(values, exponent, "KronDecomposed", f"block {index}'s spectrum")
                for index, values in enumerate(self.eigenvalues)
            ]
        )

    def __add__(self, deltas) -> "KronDecomposed":
        """Add a scalar or one delta per block (a tensor ``[len(params)]``) to ``deltas``."""
        if isinstance(deltas, Tensor):  # keeps its autograd graph (prior precision)
            added = self._as_deltas(deltas, len(self.params), self.eigenvalues[0])
            return self._with(deltas=self.deltas + added)
        return super().__add__(deltas)

    __radd__ = __add__

    def _add_scalar(self, value: float) -> "KronDecomposed":
        return self._with(deltas=self.deltas + value)

    def _scale(self, value: float) -> "KronDecomposed":
        if self.damping and value <= 0:
            raise ValueError(
                f"KronDecomposed(damping=True) * {value}: the damped form needs a positive factor."
            )
        return self._with(
            eigenvalues=[_spread_scale(v, value) for v in self.factor_eigenvalues],
            deltas=self.deltas * value,
        )

    def _add_same(self, other: "KronDecomposed") -> "KronDecomposed":
        raise ValueError(
            "Cannot add two KronDecomposed operators (their eigenbases differ): add "
            "the KronOperators, then decompose(); KronDecomposed takes + deltas only."
        )

    def __len__(self) -> int:
        """The number of blocks (as laplace-torch's ``len``)."""
        return len(self.params)

    def detach(self) -> "KronDecomposed":
        """Detach the deltas (and the factors) from autograd, in place; returns ``self``."""
        self.deltas = self.deltas.detach()
        self.factor_eigenvalues = [
            [lam.detach() for lam in values] for values in self.factor_eigenvalues
        ]
        self.eigenvectors = [[q.detach() for q in qs] for qs in self.eigenvectors]
        self.eigenvalues = self._block_eigenvalues()
        return self

    def _check_batch(self, W: Tensor, what: str) -> None:
        if W.ndim != 3 or W.shape[-1] != self.shape[0]:
            raise ValueError(
                f"KronDecomposed.{what}: expected W of shape [batch, classes, "
                f"{self.shape[0]}], got {list(W.shape)}."
            )

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        r""":math:`B^{\text{exponent}}` applied to each row of ``W``.

        Args:
            W: ``[batch, classes, P]`` (also ``[P]`` and ``[batch, P]``).
            exponent: The power of the operator. Default ``-1`` (laplace-torch's).

        Returns:
            :math:`W B^{\text{exponent}}` (``B`` is symmetric), ``W``'s shape.

        Raises:
            ValueError: If ``W``'s last axis is not ``P``, or the power is
                singular (negative exponent, zero eigenvalue) or not real.
        """
        if W.ndim in (1, 2):
            return self.bmm(W.reshape(-1, 1, W.shape[-1]), exponent).reshape(W.shape)
        self._check_batch(W, "bmm")
        batch, classes, size = W.shape
        rows = W.reshape(batch * classes, size).T
        return self._powered(exponent)._matmat(rows).T.reshape(W.shape)

    def inv_square_form(self, W: Tensor) -> Tensor:
        r""":math:`W B^{-1} W^\top` per batch entry, ``[batch, classes, classes]`` for ``W``
        ``[batch, classes, P]``."""
        self._check_batch(W, "inv_square_form")
        return torch.bmm(W, self.bmm(W, exponent=-1).transpose(1, 2))

    def diag(self, exponent: float = 1) -> Tensor:
        r"""The diagonal ``[P]`` of :math:`B^{\text{exponent}}`."""
        if exponent == 1:
            return super().diag()
        return self._powered(exponent).diag()

    def to_matrix(self, exponent: float = 1) -> Tensor:
        r"""The dense :math:`B^{\text{exponent}}` ``[P, P]`` (for small operators and tests)."""
        if exponent == 1:
            return self.to_dense()
        return self._powered(exponent).to_dense()


__all__ = ["KronOperator", "KronEigenOperator", "KronDecomposed", "kron_matmat"]
