r"""Directional derivatives along GGN eigenvectors and damped Newton steps (ViViT).

Along a unit eigenvector :math:`e_k` of a GGN block (chosen as by
:class:`~curvext.extensions.GGNEigen`), each sample :math:`n` has a slope and
a curvature,

.. math:: \gamma_{nk} = N\, g_n^\top e_k, \qquad
          \lambda_{nk} = N\, e_k^\top G_n e_k,

with :math:`g_n` the individual gradient (curvext's ``BatchGrad``: the
gradient of :math:`c\,\ell_n`, summing to ``p.grad``) and :math:`G_n` the
per-sample GGN (summing to the GGN :math:`G`). The factor :math:`N` is
ViViT's (it undoes the :math:`1/N` of ``reduction="mean"``), so that for any
reduction the batch means are the directional derivatives of the loss,
:math:`\frac1N\sum_n \gamma_{nk} = \nabla L^\top e_k` and
:math:`\frac1N\sum_n \lambda_{nk} = e_k^\top G e_k = \lambda_k`.

Everything is computed in Gram space (Dangel et al., 2022, "ViViT: Curvature
access through the generalized Gauss-Newton's low-rank structure"): with
:math:`V` the per-sample vectors :math:`v_{mj}` of the GGN
(:math:`G = V^\top V`), an eigenpair :math:`(\lambda_k, u_k)` of the Gram
matrix :math:`V V^\top` gives :math:`e_k = V^\top u_k / \sqrt{\lambda_k}`, so

.. math:: \gamma_{nk} = N \frac{(g_n^\top V^\top) u_k}{\sqrt{\lambda_k}}, \qquad
          \lambda_{nk} = N \lambda_k \sum_j u_{k,(j, n)}^2 ,

where :math:`g_n^\top V^\top` is a row of the Gram matrix of the
concatenated vectors :math:`[V; g_1 \dots g_N]` (one Gram block per parameter,
as for ``GGNEigen``; the gradient is one more column of the same backward
pass). No per-sample vector is formed for layers with factored Gram blocks.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from curvext.extensions.base import GRADIENT, RunInfo, ggn_columns
from curvext.extensions.ggn_eigen import (
    GGNEigen,
    _group_dtype,
    _group_gram,
    _group_vectors,
)


class _Directions(NamedTuple):
    """A group's chosen eigenpairs and the directional derivatives along them."""

    evals: Tensor  # [k]
    basis: Tensor  # [K N_ggn, k], Gram-space eigenvectors
    gammas: Tensor  # [N_grad, k]
    lambdas: Tensor  # [N_ggn, k]
    ggn_rows: Tensor  # rows of the full Gram matrix that the basis spans
    scale: float  # N / N_ggn


class GGNDirectionalDerivatives(GGNEigen):
    r"""Per-sample directional derivatives along GGN eigenvectors.

    Every parameter of a group holds the group's ``p.ggn_gammas``
    ``[N, k]`` (first order, :math:`\gamma_{nk} = N\, g_n^\top e_k`) and
    ``p.ggn_lambdas`` ``[N, k]`` (second order, :math:`\lambda_{nk} = N\,
    e_k^\top G_n e_k`), the same tensors for the whole group, with
    :math:`e_k` the group's chosen GGN eigenvectors in descending order of
    their eigenvalues, largest first (as ``GGNEigen`` returns them; the eigenvectors
    themselves are not formed). :math:`g_n` are the individual gradients of
    ``BatchGrad`` and :math:`G_n` the per-sample GGNs (summing to ``p.grad``
    and to the GGN); the factor :math:`N` is ViViT's, so that the batch means
    are the derivatives of the loss along :math:`e_k`:
    ``gammas.mean(0)`` is :math:`\nabla L^\top e_k` and ``lambdas.mean(0)``
    the eigenvalues (without sub-sampling). Up to the sign of each
    :math:`e_k`, which flips :math:`\gamma_{\cdot k}`.

    **Sub-sampling** (ViViT's). ``subsampling_ggn`` estimates the GGN from a
    subset :math:`S` of the batch, :math:`\hat G = \frac{N}{|S|} \sum_{n \in
    S} G_n`; its eigenvectors are the directions, and ``lambdas`` holds the
    rows :math:`n \in S` (in the order given). ``subsampling_grad`` keeps the
    rows :math:`n` of ``gammas`` in that list. Sub-sampling selects rows of
    the Gram matrix, so it saves the cost of the eigendecomposition, not that
    of the backward pass (which runs on the whole batch).

    Args:
        top_k, criterion, param_groups, mc_samples: Which eigenpairs of which
            GGN blocks, as for :class:`~curvext.extensions.GGNEigen` (``top_k``
            is at most ``|S|·K`` with sub-sampling).
        subsampling_grad: Indices of the samples whose ``gammas`` are
            computed (unique, in ``[0, N)``). Default: all.
        subsampling_ggn: Indices of the samples whose GGN defines the
            directions and whose ``lambdas`` are computed. Default: all.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                                    torch.nn.Linear(4, 2)))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.tensor([0, 1, 1, 0, 1]))
        >>> ext = GGNDirectionalDerivatives(top_k=2)
        >>> with backpack(ext):
        ...     loss.backward()
        >>> model[0].weight.ggn_gammas.shape, model[0].weight.ggn_lambdas.shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
        >>> gammas, lambdas = ext.result(0)
        >>> torch.allclose(lambdas.mean(0), ext.eigenvalues(0))
        True
    """

    savefield = "ggn_gammas"

    def __init__(
        self,
        top_k: Optional[int] = None,
        criterion: Optional[Callable[[Tensor], Any]] = None,
        param_groups: Optional[Sequence[Dict[str, Any]]] = None,
        mc_samples: int = 0,
        subsampling_grad: Optional[Sequence[int]] = None,
        subsampling_ggn: Optional[Sequence[int]] = None,
    ):
        super().__init__(top_k, criterion, param_groups, mc_samples, eigenvectors=False)
        owner = type(self).__name__
        self.subsampling_grad = _check_subsampling(owner, "subsampling_grad", subsampling_grad)
        self.subsampling_ggn = _check_subsampling(owner, "subsampling_ggn", subsampling_ggn)
        self._evals: Optional[List[Tensor]] = None

    def _repr_args(self) -> List[str]:
        args = [arg for arg in super()._repr_args() if not arg.startswith("eigenvectors=")]
        return args + [
            f"subsampling_grad={self.subsampling_grad}",
            f"subsampling_ggn={self.subsampling_ggn}",
        ]

    def column_sets(self):
        # the loss gradient is one more column of the same backward pass
        return (ggn_columns(self.mc_samples), GRADIENT)

    def finalize(self, rule, name, partial, info):
        if partial is None or any(part is None for part in partial):
            return None
        # Gram factors of the GGN columns and of the gradient, concatenated
        # along the column axis: rows k * N + n, the gradient last (k = K)
        return super().finalize(rule, name, torch.cat(partial), info)

    def finalize_all(self, results: List[Tuple[Tensor, Any]], info: RunInfo) -> None:
        self._evals = []
        super().finalize_all(results, info)

    def _group_result(self, index, group, pieces, num_columns, info):
        directions = self._directions(index, group, pieces, num_columns, info)
        dtype = _group_dtype(group)
        gammas, lambdas = directions.gammas.to(dtype), directions.lambdas.to(dtype)
        for param in group:
            setattr(param, "ggn_gammas", gammas)
            setattr(param, "ggn_lambdas", lambdas)
        return gammas, lambdas

    def _directions(self, index, group, pieces, num_columns, info) -> _Directions:
        batch = info.batch_size
        num_ggn = num_columns - 1
        ggn_samples = self._samples("subsampling_ggn", self.subsampling_ggn, batch)
        grad_samples = self._samples("subsampling_grad", self.subsampling_grad, batch)
        num_dir = len(ggn_samples)
        subset = "" if self.subsampling_ggn is None else " in subsampling_ggn"
        self._check_top_k(num_ggn * num_dir, f"N = {num_dir} samples{subset} × K = {num_ggn}")
        gram = _group_gram(group, pieces, num_columns * batch)
        ggn_samples, grad_samples = ggn_samples.to(gram.device), grad_samples.to(gram.device)
        columns = torch.arange(num_ggn, device=gram.device)
        ggn_rows = (columns[:, None] * batch + ggn_samples).flatten()
        grad_rows = num_ggn * batch + grad_samples
        scale = batch / num_dir
        # ViViT: the GGN of a subset S is estimated as N / |S| times its sum
        evals, basis = self._decompose(index, group, gram[ggn_rows][:, ggn_rows] * scale)
        num = len(evals)
        cross = gram[grad_rows][:, ggn_rows]  # g_n . v_mj
        gammas = batch * math.sqrt(scale) * (cross @ basis) / evals.sqrt()
        lambdas = num_dir * evals * basis.reshape(num_ggn, num_dir, num).square().sum(0)
        self._evals.append(evals.to(_group_dtype(group)))
        return _Directions(evals, basis, gammas, lambdas, ggn_rows, scale)

    def _samples(self, argument: str, indices: Optional[List[int]], batch: int) -> Tensor:
        if indices is None:
            return torch.arange(batch)
        if max(indices) >= batch:
            raise IndexError(
                f"{type(self).__name__}({argument}={indices}) holds the index "
                f"{max(indices)}, but this batch has N = {batch} samples. Use indices "
                f"in [0, {batch})."
            )
        return torch.tensor(indices)

    def eigenvalues(self, group_index: int = 0) -> Tensor:
        """The group's chosen GGN eigenvalues ``[k]`` (descending) after the last
        backward pass: the directions of the derivatives."""
        self._check_group(group_index)
        return self._evals[group_index]

    def result(self, group_index: int = 0) -> Tuple[Tensor, Tensor]:
        """``(gammas [N_grad, k], lambdas [N_ggn, k])`` of a group after the last
        backward pass (what its parameters hold)."""
        return super().result(group_index)


Damping = Union[float, Callable[[Tensor, Tensor, Tensor], Tensor]]


class DampedNewtonStep(GGNDirectionalDerivatives):
    r"""Damped Newton step in the span of GGN eigenvectors, ``p.damped_newton_step``.

    .. math:: s = \sum_k -\frac{\bar\gamma_k}{\bar\lambda_k + \delta_k} e_k,
              \qquad \bar\gamma_k = \frac1{N}\sum_n \gamma_{nk}, \quad
              \bar\lambda_k = \frac1{N}\sum_n \lambda_{nk},

    with :math:`\gamma, \lambda` as in :class:`GGNDirectionalDerivatives`
    (ViViT's ``DampedNewton``: the means are over the sub-sampled rows where
    sub-sampling is used). Without sub-sampling :math:`\bar\gamma_k =
    \nabla L^\top e_k` and :math:`\bar\lambda_k = \lambda_k`, so :math:`s` is
    the minimiser of the quadratic model :math:`\nabla L^\top s + \frac12
    s^\top (G + E \operatorname{diag}(\delta) E^\top) s` restricted to the
    span of the chosen eigenvectors :math:`E`. Every parameter of a group
    holds its slice of the group's step (shape of ``p``; a parameter the
    loss does not reach gets zeros). Apply it with ``p.data.add_(lr *
    p.damped_newton_step)``. The step is mapped from Gram space
    without forming the eigenvectors.

    Args:
        damping: :math:`\delta`. A number ``>= 0`` (the same for every
            direction), or a callable ``damping(evals, gammas, lambdas) ->
            δ`` returning a tensor ``[k]`` (``evals [k]``, ``gammas
            [N_grad, k]``, ``lambdas [N_ggn, k]``), e.g. ViViT's bootstrap
            damping. Its values must be ``>= 0``; ``inf`` drops a direction
            (ViViT's bootstrap damping returns ``inf`` when no damping gives
            a positive gain).
        top_k, criterion, param_groups, mc_samples, subsampling_grad,
            subsampling_ggn: As for :class:`GGNDirectionalDerivatives`.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                                    torch.nn.Linear(4, 2)))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.tensor([0, 1, 1, 0, 1]))
        >>> with backpack(DampedNewtonStep(damping=1e-3, top_k=3)):
        ...     loss.backward()
        >>> with torch.no_grad():
        ...     for p in model.parameters():
        ...         _ = p.add_(p.damped_newton_step)
        >>> model[0].weight.damped_newton_step.shape
        torch.Size([4, 3])
    """

    savefield = "damped_newton_step"

    def __init__(
        self,
        damping: Damping,
        top_k: Optional[int] = None,
        criterion: Optional[Callable[[Tensor], Any]] = None,
        param_groups: Optional[Sequence[Dict[str, Any]]] = None,
        mc_samples: int = 0,
        subsampling_grad: Optional[Sequence[int]] = None,
        subsampling_ggn: Optional[Sequence[int]] = None,
    ):
        super().__init__(
            top_k, criterion, param_groups, mc_samples, subsampling_grad, subsampling_ggn
        )
        self.damping = _check_damping(damping)

    def _repr_args(self) -> List[str]:
        return [f"damping={self.damping!r}"] + super()._repr_args()

    def _keeps_factors(self) -> bool:
        return True  # the step is mapped back to parameter space

    def _group_result(self, index, group, pieces, num_columns, info):
        directions = self._directions(index, group, pieces, num_columns, info)
        evals, gammas, lambdas = directions.evals, directions.gammas, directions.lambdas
        damping = self._damping_values(evals, gammas, lambdas)
        step = -gammas.mean(0) / (lambdas.mean(0) + damping)  # along each e_k
        # s = Σ_k step_k e_k with e_k = √scale · Vᵀ u_k / √λ_k (Gram space)
        coefficients = evals.new_zeros(num_columns * info.batch_size, 1)
        coefficients[directions.ggn_rows, 0] = math.sqrt(directions.scale) * (
            directions.basis @ (step / evals.sqrt())
        )
        steps = [vectors[0] for vectors in _group_vectors(group, pieces, coefficients)]
        for param, param_step in zip(group, steps):
            setattr(param, "damped_newton_step", param_step)
        return steps

    def _damping_values(self, evals: Tensor, gammas: Tensor, lambdas: Tensor) -> Tensor:
        """δ ``[k]`` from the constant or the callable, checked."""
        if not callable(self.damping):
            return torch.full_like(evals, self.damping)
        value = self.damping(evals, gammas, lambdas)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"DampedNewtonStep(damping=...) returned a {type(value).__name__}; "
                f"return a tensor of shape [k] = [{len(evals)}] (one damping per "
                "direction), e.g. torch.full_like(evals, 1e-3)."
            )
        if value.shape != evals.shape:
            raise ValueError(
                f"DampedNewtonStep(damping=...) returned a tensor of shape "
                f"{tuple(value.shape)} for k = {len(evals)} directions; return one "
                f"damping per direction, shape [{len(evals)}], e.g. "
                "torch.full_like(evals, 1e-3)."
            )
        value = value.to(evals)
        if bool(torch.isnan(value).any()) or bool((value < 0).any()):
            raise ValueError(
                f"DampedNewtonStep(damping=...) returned {value.tolist()}; dampings "
                "must be >= 0 (inf drops a direction) and not NaN."
            )
        return value

    def result(self, group_index: int = 0) -> List[Tensor]:
        """``[step per parameter]`` (shape of each parameter) of a group after the
        last backward pass, in the order of :meth:`params`."""
        return GGNEigen.result(self, group_index)


def _check_subsampling(owner: str, argument: str, indices) -> Optional[List[int]]:
    """``None`` or a non-empty list of unique non-negative sample indices."""
    if indices is None:
        return None
    if isinstance(indices, Tensor):
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(
                f"{owner}({argument}=...) got a tensor of dtype {indices.dtype} and "
                f"shape {tuple(indices.shape)}; pass a 1d list of sample indices."
            )
        indices = indices.tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise TypeError(
            f"{owner}({argument}={indices!r}) must be a list of sample indices or None."
        )
    indices = list(indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(
            f"{owner}({argument}=...) holds {bad[0]!r}; it must hold sample indices (ints)."
        )
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{owner}({argument}=[]) selects no sample; pass None for all.")
    if min(indices) < 0:
        raise ValueError(
            f"{owner}({argument}={indices}) holds the negative index {min(indices)}; "
            "use indices in [0, N)."
        )
    if len(set(indices)) != len(indices):
        raise ValueError(
            f"{owner}({argument}={indices}) holds an index twice; each sample may be selected once."
        )
    return indices


def _check_damping(damping) -> Damping:
    if callable(damping):
        return damping
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(
            f"DampedNewtonStep(damping={damping!r}) is invalid: pass a number >= 0 or a "
            "callable (evals, gammas, lambdas) -> damping per direction [k]."
        )
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(
            f"DampedNewtonStep(damping={damping!r}) is invalid: a constant damping "
            "must be finite and >= 0."
        )
    return float(damping)


__all__ = ["GGNDirectionalDerivatives", "DampedNewtonStep"]
