r"""Eigenpairs of the GGN (or of blocks of it) in Gram space (ViViT).

With :math:`V \in \mathbb{R}^{NK \times P}` the per-sample vectors
:math:`v_{nk}` of a group of parameters (rows), the GGN block of the group is
:math:`G = V^\top V`. Its nonzero eigenvalues are those of the Gram matrix

.. math:: \tilde G = V V^\top = \sum_{p \in \text{group}} V_p V_p^\top
          \in \mathbb{R}^{NK \times NK},

a sum of per-parameter Gram blocks, and an eigenvector :math:`u` of
:math:`\tilde G` with eigenvalue :math:`\lambda > 0` gives the unit
eigenvector :math:`e = V^\top u / \sqrt{\lambda}` of :math:`G`
(Dangel et al., 2022, "ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure"). The top of the spectrum of a network
with millions of parameters therefore costs one backward pass and an
eigendecomposition of an :math:`NK \times NK` matrix.

Module rules provide the Gram blocks (:meth:`ModuleRule.gram`); for
``Linear``/``Conv`` weights acting at a single position they are
:math:`(G G^\top) \odot (A A^\top)`, without per-sample vectors.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from curvext.extensions.base import Combine, Extension, RunInfo, check_mc_samples, ggn_columns
from curvext.rules.families import Grads, GramRule


class _GramPiece:
    """One parameter's Gram factor, the rule that reads it, and whether the
    factor is kept after the group's Gram matrix is formed (to map
    coefficients back to the parameter's space)."""

    def __init__(self, rule, name: str, factor: Tensor, keep_factor: bool):
        self.rule, self.name, self.factor = rule, name, factor
        self.num_columns = factor.shape[0]
        self.keep_factor = keep_factor

    def vectors(self, coefficients: Tensor) -> Tensor:
        return self.rule.gram_vectors(self.name, self.factor, coefficients)


class GGNEigen(Extension):
    r"""Eigenvalues ``p.ggn_eigvals`` and eigenvectors ``p.ggn_eigvecs`` of GGN blocks.

    Every parameter of a group holds the group's eigenvalues ``p.ggn_eigvals``
    ``[k]`` (descending: largest first, as everywhere in curvext; the same
    tensor for the whole group) and, with
    ``eigenvectors=True``, ``p.ggn_eigvecs`` ``[k, *p.shape]``: its slice of
    the group's eigenvectors. Concatenated over the group's parameters
    (``torch.cat([p.ggn_eigvecs.flatten(1) for p in group], 1)``) the
    eigenvectors are orthonormal and satisfy :math:`G e = \lambda e` for the
    group's GGN block :math:`G`.

    **Which eigenvalues are "nonzero".** The Gram matrix has :math:`NK`
    eigenvalues, of which those beyond the GGN's rank are zero up to
    rounding. An eigenvalue is kept if

    .. math:: \lambda > \lambda_{\max} \cdot NK \cdot \varepsilon,

    with :math:`\varepsilon` the machine epsilon of the parameters' dtype
    (``torch.finfo(dtype).eps``; the largest over the group), the size of the
    rounding error of an eigendecomposition of the Gram matrix relative to
    its largest eigenvalue. Eigenvectors of kept eigenvalues close to the
    threshold are accurate only to about :math:`\varepsilon
    \lambda_{\max} / \lambda`; select the top of the spectrum (``top_k``,
    ``criterion``) when the eigenvectors matter. ``top_k`` and ``criterion``
    choose among the kept eigenvalues, so fewer than ``top_k`` pairs are
    returned when the GGN's rank is smaller.

    **Precision.** Gram blocks are computed in the parameters' dtype and the
    eigendecomposition (``torch.linalg.eigh``, or LAPACK's ``syevr`` on CPU:
    :func:`symmetric_eigen`) runs in that dtype too
    (float32 for half precision, which ``eigh`` does not support): upcasting
    a Gram matrix whose entries carry float32 rounding errors to float64 would
    not make its eigenvalues more accurate.

    Args:
        top_k: Keep the ``top_k`` largest eigenvalues (at most ``N·K``, the
            number of per-sample vectors). Default: all nonzero ones.
        criterion: ``criterion(evals) -> indices``: which of the nonzero
            eigenvalues (given in descending order, largest first; ViViT's
            interface, whose eigenvalues are ascending) to keep, e.g.
            ``lambda evals: (evals > 1.0).nonzero().flatten()``. Mutually
            exclusive with ``top_k``.
        param_groups: As for a torch optimizer, a list of dicts whose
            ``"params"`` hold the parameters of one GGN block each. Default:
            one group with every trainable parameter in the loss's graph (the
            full GGN). Parameters with ``requires_grad=False`` are skipped;
            parameters in no group get nothing. A parameter of a group that
            the loss does not depend on has a zero GGN block: it gets the
            group's eigenvalues and zero eigenvectors.
        mc_samples: 0 (default) for the exact GGN, ``M > 0`` for the
            eigenpairs of its Monte-Carlo estimate with ``M`` samples (then
            ``K = M``).
        eigenvectors: Whether to compute ``p.ggn_eigvecs`` (default). Without
            them no per-sample vectors are kept after the Gram blocks are
            formed.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                                    torch.nn.Linear(4, 2)))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.tensor([0, 1, 1, 0, 1]))
        >>> ext = GGNEigen(top_k=3)
        >>> with backpack(ext):
        ...     loss.backward()
        >>> model[0].weight.ggn_eigvals.shape, model[0].weight.ggn_eigvecs.shape
        (torch.Size([3]), torch.Size([3, 4, 3]))
        >>> evals, evecs = ext.result(0)
        >>> E = torch.cat([e.flatten(1) for e in evecs], dim=1)  # [3, P]
        >>> torch.allclose(E @ E.T, torch.eye(3), atol=1e-5)
        True
        >>> blocks = GGNEigen(param_groups=[{"params": model[0].parameters()},
        ...                                 {"params": model[2].parameters()}])
    """

    savefield = "ggn_eigvals"
    combine = Combine.CAT

    def __init__(
        self,
        top_k: Optional[int] = None,
        criterion: Optional[Callable[[Tensor], Any]] = None,
        param_groups: Optional[Sequence[Dict[str, Any]]] = None,
        mc_samples: int = 0,
        eigenvectors: bool = True,
    ):
        owner = type(self).__name__
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(
                f"{owner}(top_k={top_k!r}) is invalid: use a positive number of "
                "eigenpairs, or None for all nonzero ones."
            )
        if criterion is not None and not callable(criterion):
            raise TypeError(
                f"{owner}(criterion={criterion!r}) is not callable: pass a function "
                "evals -> indices of the eigenvalues to keep."
            )
        if top_k is not None and criterion is not None:
            raise ValueError(
                f"{owner} got both top_k and criterion; pass one of them (top_k=k is "
                "criterion=lambda evals: range(k): the eigenvalues come largest first)."
            )
        self.top_k = top_k
        self.criterion = criterion
        self.mc_samples = check_mc_samples(owner, mc_samples)
        self.eigenvectors = bool(eigenvectors)
        self.param_groups = _check_param_groups(param_groups, owner)
        self._group_of = (
            None
            if self.param_groups is None
            else {id(p): i for i, group in enumerate(self.param_groups) for p in group}
        )
        self._groups: Optional[List[List[Tensor]]] = None
        self._results: Optional[List[Tuple[Tensor, Optional[List[Tensor]]]]] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._repr_args())})"

    def _repr_args(self) -> List[str]:
        groups = (
            None
            if self.param_groups is None
            else [f"<{len(group)} params>" for group in self.param_groups]
        )
        return [
            f"top_k={self.top_k!r}",
            f"criterion={self.criterion!r}",
            f"param_groups={groups}",
            f"mc_samples={self.mc_samples}",
            f"eigenvectors={self.eigenvectors}",
        ]

    def column_set(self):
        return ggn_columns(self.mc_samples)

    def _in_groups(self, param: Tensor) -> bool:
        return self._group_of is None or id(param) in self._group_of

    def reduce(self, rule: GramRule, name: str, grads: Grads) -> Optional[Tensor]:
        param = rule.param(name)
        if not self._in_groups(param):
            return param.new_empty(0)  # concatenates over chunks, never read
        return rule.gram_factor(name, grads)

    def finalize(self, rule: GramRule, name: str, partial: Optional[Tensor], info: RunInfo):
        if partial is None or not self._in_groups(rule.param(name)):
            return None
        return _GramPiece(rule, name, partial, self._keeps_factors())

    def _keeps_factors(self) -> bool:
        """Whether Gram factors are kept after the Gram blocks are formed (to
        map Gram-space coefficients back to parameter space)."""
        return self.eigenvectors

    def finalize_all(self, results: List[Tuple[Tensor, Any]], info: RunInfo) -> None:
        pieces = {id(param): piece for param, piece in results if piece is not None}
        if self.param_groups is None:
            groups = [[param for param, piece in results if piece is not None]]
        else:
            groups = self.param_groups
        num_columns = next((piece.num_columns for piece in pieces.values()), 0)
        self._groups, self._results = groups, []
        for index, group in enumerate(groups):
            group_pieces = [pieces.get(id(param)) for param in group]
            self._results.append(self._group_result(index, group, group_pieces, num_columns, info))

    def _group_result(
        self,
        index: int,
        group: List[Tensor],
        pieces: List[Optional[_GramPiece]],
        num_columns: int,
        info: RunInfo,
    ) -> Any:
        """Compute and store the result of one group; returned by :meth:`result`."""
        size = info.batch_size * num_columns
        self._check_top_k(size, f"N = {info.batch_size} samples × K = {num_columns}")
        gram = _group_gram(group, pieces, size)
        evals, basis = self._decompose(index, group, gram, with_basis=self.eigenvectors)
        evecs = None
        if self.eigenvectors:
            evecs = _group_vectors(group, pieces, basis / evals.sqrt())
        evals = evals.to(_group_dtype(group))
        for position, param in enumerate(group):
            setattr(param, "ggn_eigvals", evals)
            if evecs is not None:
                setattr(param, "ggn_eigvecs", evecs[position])
        return evals, evecs

    def _check_top_k(self, size: int, factors: str):
        """Refuse ``top_k`` beyond the rank bound ``size`` (``factors`` explains it)."""
        if self.top_k is not None and self.top_k > size:
            raise ValueError(
                f"{type(self).__name__}(top_k={self.top_k}) asks for more eigenpairs "
                f"than the GGN of this batch can have: its rank is at most N·K = "
                f"{size} ({factors} columns per sample). Use top_k <= {size}, or a "
                "larger batch."
            )

    def _decompose(
        self, index: int, group: List[Tensor], gram: Tensor, with_basis: bool = True
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Chosen nonzero eigenvalues ``[k]`` (descending) of a group's Gram
        matrix and their eigenvectors ``[NK, k]`` (``None`` without
        ``with_basis``: eigenvalues alone are several times cheaper), in the
        Gram matrix's dtype."""
        size = gram.shape[0]
        eps = max(torch.finfo(param.dtype).eps for param in group)
        # one reduction; a sum that overflows on finite entries is rechecked
        finite = bool(torch.isfinite(gram.sum())) or bool(torch.isfinite(gram).all())
        # with top_k only the largest eigenpairs are needed (the threshold
        # reads the largest eigenvalue, which is among them)
        top = self.top_k if self.criterion is None else None
        basis = None
        if finite:
            try:
                evals, basis = symmetric_eigen(gram, with_basis, top)
            except torch.linalg.LinAlgError:
                finite = False
            else:
                finite = bool(torch.isfinite(evals).all())
        if not finite:
            shapes = ", ".join(str(tuple(param.shape)) for param in group)
            where = (
                "the default group (the full GGN)"
                if self.param_groups is None
                else f"param_groups[{index}]"
            )
            raise RuntimeError(
                f"{type(self).__name__}: the GGN block of {where} (parameters of shapes "
                f"{shapes}) has non-finite eigenvalues: its Gram matrix overflowed "
                "or a value of this batch is not finite. Check the inputs, the "
                "parameters and the learning rate, or compute in float64."
            )
        if size > 0:
            threshold = evals[-1].clamp(min=0) * size * eps
            # kept and flipped: largest first
            keep = (evals > threshold).nonzero().flatten().flip(0)
            evals = evals[keep]
            basis = None if basis is None else basis[:, keep]
        chosen = self._choose(evals)
        if chosen is not None:
            evals = evals[chosen]
            basis = None if basis is None else basis[:, chosen]
        return evals, basis

    def _choose(self, evals: Tensor) -> Optional[Tensor]:
        """Indices (ascending, so the eigenvalues stay largest first) of the
        kept eigenvalues among the nonzero ones ``evals`` (descending)."""
        if self.top_k is not None:
            return torch.arange(min(self.top_k, len(evals)), device=evals.device)
        if self.criterion is None:
            return None
        chosen = torch.as_tensor(self.criterion(evals), device=evals.device).flatten()
        if chosen.dtype == torch.bool:
            raise TypeError(
                f"{type(self).__name__}(criterion=...) returned a boolean mask; return indices, "
                "e.g. mask.nonzero().flatten()."
            )
        chosen = chosen.long()
        if len(chosen) and (chosen.min() < -len(evals) or chosen.max() >= len(evals)):
            raise IndexError(
                f"{type(self).__name__}(criterion=...) returned indices {chosen.tolist()} out of "
                f"range for {len(evals)} nonzero eigenvalues."
            )
        return torch.unique(chosen % max(len(evals), 1))  # sorted: stays descending

    def params(self, group_index: int) -> List[Tensor]:
        """The parameters of a group, in the order of :meth:`result`'s eigenvectors.

        For the default group: every trainable parameter in the loss's graph,
        in the order in which the engine found them there (not necessarily
        ``model.parameters()``'s).
        """
        self._check_group(group_index)
        return list(self._groups[group_index])

    @property
    def has_result(self) -> bool:
        """Whether a backward pass with this extension has run."""
        return self._results is not None

    @property
    def num_groups(self) -> int:
        """Number of parameter groups of the latest backward pass (0 before one)."""
        return 0 if self._results is None else len(self._results)

    def result(self, group_index: int = 0) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """``(evals [k], [evecs [k, *p.shape] per parameter])`` of a group after
        the last backward pass (``None`` for the eigenvectors with
        ``eigenvectors=False``)."""
        self._check_group(group_index)
        return self._results[group_index]

    def _check_group(self, group_index: int):
        owner = type(self).__name__
        if self._results is None:
            raise RuntimeError(
                f"{owner} has no result yet: call loss.backward() inside "
                "`with backpack(ext):` first."
            )
        if not -len(self._results) <= group_index < len(self._results):
            raise IndexError(
                f"{owner} has {len(self._results)} parameter group(s); "
                f"group_index={group_index} is out of range."
            )


#: Smallest Gram matrix whose CPU eigendecomposition goes to LAPACK's
#: ``syevr`` through SciPy. Measured in whole ``GGNEigen`` units on a 2-core
#: CPU with 2 torch threads: at 128 (MC Gram matrices of a batch of 128) the
#: torch path was faster (MLP 6.1 vs 7.2 ms with top_k=5), at 1152 (exact,
#: C-1 columns) ``syevr`` was (68 vs 95 ms for the top 5 eigenpairs).
LAPACK_MIN_SIZE = 512


def symmetric_eigen(
    matrix: Tensor, with_basis: bool = True, top: Optional[int] = None
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Eigenvalues ``[m]`` (ascending) and eigenvectors ``[n, m]`` (``None``
    without ``with_basis``) of a symmetric matrix ``[n, n]`` (its lower
    triangle is read): all of them (``m = n``), or the ``top`` largest.

    ``torch.linalg.eigh``/``eigvalsh`` (LAPACK ``syevd`` on CPU), except on
    CPU in float32/float64 for ``n >=`` :data:`LAPACK_MIN_SIZE` when SciPy and
    threadpoolctl are installed: there LAPACK's ``syevr`` (multiple relatively
    robust representations) computes the same eigenpairs, and only those
    asked for, on one BLAS thread (SciPy's BLAS has a thread pool of its own,
    whose spinning workers would compete with torch's). On a 1152 × 1152 Gram
    matrix it took 0.4-0.8× ``eigvalsh``'s time for the eigenvalues and
    0.35-0.7× ``eigh``'s for the top 5 eigenpairs. Raises
    ``torch.linalg.LinAlgError`` if the algorithm fails.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> symmetric_eigen(A, with_basis=False)[0]
        tensor([1., 3.])
        >>> evals, basis = symmetric_eigen(A, top=1)
        >>> evals, basis.abs()
        (tensor([3.]), tensor([[0.7071],
                [0.7071]]))
    """
    size = matrix.shape[0]
    top = None if top is None or top >= size else top
    syevr = _cpu_syevr(matrix)
    if syevr is None:
        if with_basis:
            evals, basis = torch.linalg.eigh(matrix)
        else:
            evals, basis = torch.linalg.eigvalsh(matrix), None
        if top is not None:
            evals = evals[size - top :]
            basis = None if basis is None else basis[:, size - top :]
        return evals, basis
    # the transpose of a row-major symmetric matrix is itself in LAPACK's
    # column-major layout; its lower triangle is the matrix's upper one
    array = matrix.detach().T.numpy()
    options = {} if top is None else {"range": "I", "il": size - top + 1, "iu": size}
    syevr, threads = syevr
    # SciPy's BLAS has its own thread pool; with more than one thread its
    # workers keep spinning after the call and slow down torch's own pool in
    # the rest of the backward pass (measured: 2x slower units on 2 cores)
    with threads.limit(limits=1, user_api="blas"):
        evals, basis, count, _, info = syevr(
            array, compute_v=int(with_basis), lower=0, overwrite_a=0, **options
        )
    if info != 0:
        raise torch.linalg.LinAlgError(f"LAPACK syevr failed (info = {info})")
    evals = torch.from_numpy(evals[:count])
    basis = torch.from_numpy(basis[:, :count]) if with_basis else None
    return evals, basis


_LAPACK: List[Any] = []  # [(ssyevr, dsyevr, thread-pool controller)] or [None]


def _cpu_syevr(matrix: Tensor):
    """``(syevr, thread-pool controller)`` for ``matrix`` from SciPy and
    threadpoolctl, or ``None`` where torch decomposes it (either missing, not
    on CPU, small, or another dtype)."""
    if (
        matrix.device.type != "cpu"
        or matrix.dtype not in (torch.float32, torch.float64)
        or matrix.shape[0] < LAPACK_MIN_SIZE
    ):
        return None
    if not _LAPACK:
        try:
            from scipy.linalg import lapack
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _LAPACK.append(None)
        else:
            _LAPACK.append((lapack.ssyevr, lapack.dsyevr, ThreadpoolController()))
    if _LAPACK[0] is None:
        return None
    single, double, threads = _LAPACK[0]
    return (single if matrix.dtype == torch.float32 else double), threads


def _group_dtype(group: List[Tensor]) -> torch.dtype:
    """The dtype that the group's parameters promote to."""
    dtype = group[0].dtype
    for param in group[1:]:
        dtype = torch.promote_types(dtype, param.dtype)
    return dtype


def _group_gram(group: List[Tensor], pieces: List[Optional[_GramPiece]], size: int) -> Tensor:
    """Sum of the group's Gram blocks ``[size, size]``, at least in float32.

    The pieces of one rule are added together (:meth:`ModuleRule.add_gram`:
    a layer's weight and bias share one product), into one matrix; factors
    not kept for eigenvectors are dropped as soon as they are added.
    """
    solve_dtype = torch.promote_types(_group_dtype(group), torch.float32)
    gram = torch.zeros(size, size, dtype=solve_dtype, device=group[0].device)
    by_rule: Dict[int, Tuple[Any, Dict[str, Tensor]]] = {}
    for piece in pieces:
        if piece is not None:
            by_rule.setdefault(id(piece.rule), (piece.rule, {}))[1][piece.name] = piece.factor
            if not piece.keep_factor:
                piece.factor = None
    batches = list(by_rule.values())
    del by_rule
    while batches:  # each rule's factors are released once added
        rule, factors = batches.pop(0)
        rule.add_gram(factors, gram)
        del factors
    return gram


def _group_vectors(
    group: List[Tensor], pieces: List[Optional[_GramPiece]], coefficients: Tensor
) -> List[Tensor]:
    r""":math:`\sum_{nk} c_{nk,j} v_{nk}` ``[J, *p.shape]`` per parameter of the
    group for Gram-space coefficients ``[NK, J]`` (zero where the loss does not
    reach the parameter)."""
    vectors = []
    for param, piece in zip(group, pieces):
        if piece is None:
            vectors.append(param.new_zeros(coefficients.shape[1], *param.shape))
        else:
            vectors.append(piece.vectors(coefficients).to(param.dtype))
    return vectors


def _check_param_groups(param_groups, owner: str = "GGNEigen") -> Optional[List[List[Tensor]]]:
    """The groups' parameters that require grad; errors name the group."""
    if param_groups is None:
        return None
    if isinstance(param_groups, (Tensor, dict)) or not isinstance(param_groups, (list, tuple)):
        raise TypeError(
            f"{owner}(param_groups=...) must be a list of dicts with a 'params' "
            f"entry, as for a torch optimizer; got {type(param_groups).__name__}."
        )
    if not param_groups:
        raise ValueError(f"{owner}(param_groups=[]) has no group; pass None for the full GGN.")
    groups, seen = [], {}
    for index, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(
                f"{owner}: param_groups[{index}] must be a dict with a 'params' "
                f"entry, e.g. {{'params': layer.parameters()}}; got {group!r}."
            )
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ValueError(f"{owner}: param_groups[{index}] has no parameters.")
        for param in params:
            if not isinstance(param, Tensor):
                raise TypeError(
                    f"{owner}: param_groups[{index}]['params'] holds a "
                    f"{type(param).__name__}; it must hold parameters (tensors)."
                )
            if id(param) in seen:
                where = seen[id(param)]
                raise ValueError(
                    f"{owner}: a parameter of shape {tuple(param.shape)} is in "
                    f"param_groups[{where}] and param_groups[{index}]"
                    f"{' (twice)' if where == index else ''}. Put every parameter in "
                    "one group only."
                )
            seen[id(param)] = index
        trainable = [param for param in params if param.requires_grad]
        if not trainable:
            raise ValueError(
                f"{owner}: no parameter of param_groups[{index}] requires grad, so "
                "its GGN block is not computed. Remove the group or unfreeze its "
                "parameters."
            )
        groups.append(trainable)
    return groups


__all__ = ["GGNEigen"]
