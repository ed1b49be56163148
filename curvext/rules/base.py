r"""The interface of a module rule and reductions that work for every rule.

A rule knows the Jacobian of one module type's output with respect to its
parameters. For a column :math:`g_{nk}` at the module output (``grads``:
one tensor ``[K, N, *output.shape[1:]]`` per recorded call) the per-sample
vector of parameter ``p`` is :math:`v_{nk} = \sum_{\text{calls}}
J_{p}^\top g_{nk}`. Rules offer the reductions of these vectors that
extensions ask for. Every reduction here is derived from
:meth:`ModuleRule.per_sample`; a rule overrides a reduction when it can
compute it without materialising ``[K, N, *p.shape]``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from curvext.recording import ModuleCall

#: Largest number of elements of per-sample vectors materialised at once by
#: the default reductions (they loop over chunks of columns beyond that).
MAX_PER_SAMPLE_ELEMENTS = 2**26

#: Largest dense KFAC factor (bytes) a rule builds: a parameter without
#: Kronecker structure has its whole GGN block (``numel²`` entries) as its one
#: factor, an ``Embedding`` a ``V × V`` input factor. Beyond this, a clear
#: error instead of an out-of-memory; raise it where the memory is there.
DENSE_FACTOR_BYTES = 2**30


def check_dense_factor(module: nn.Module, name: str, size: int, dtype: torch.dtype, what: str):
    """Raise if a dense ``size × size`` factor exceeds :data:`DENSE_FACTOR_BYTES`."""
    needed = size * size * torch.empty((), dtype=dtype).element_size()
    if needed > DENSE_FACTOR_BYTES:
        raise ValueError(
            f"KFAC of the parameter '{name}' of {type(module).__name__} needs {what}, a "
            f"dense {size} × {size} matrix ({needed / 2**30:.1f} GiB in "
            f"{str(dtype).replace('torch.', '')}), more than "
            f"curvext.rules.base.DENSE_FACTOR_BYTES ({DENSE_FACTOR_BYTES / 2**30:.1f} GiB). "
            "Leave it out of KFAC (p.requires_grad_(False) for that backward pass) "
            "and use GGNDiag for it, or raise DENSE_FACTOR_BYTES if the memory is there."
        )


class ModuleRule:
    """Reductions of the per-sample vectors of one module's parameters.

    Implements the families :class:`~curvext.rules.families.PerSampleRule`,
    :class:`~curvext.rules.families.GramRule` and
    :class:`~curvext.rules.families.KroneckerRule` for any module from
    :meth:`per_sample`, the one method a new rule must write.

    Args:
        module: The module.
        calls: Its recorded calls in this forward pass (several for tied
            weights), each with detached inputs.
        names: Names (dotted, relative to ``module``) of the parameters the
            rule handles. Default: the module's own trainable parameters.
    """

    def __init__(
        self, module: nn.Module, calls: List[ModuleCall], names: Optional[List[str]] = None
    ):
        self.module = module
        self.calls = calls
        self.names = names
        self.check()

    def check(self):
        """Raise if the module is configured in a way the rule cannot handle."""

    #: ``N``, set by :meth:`check_batch`.
    batch_size: int = 0

    def param_names(self) -> List[str]:
        """Names of the parameters this rule handles."""
        if self.names is not None:
            return list(self.names)
        return own_trainable(self.module)

    def param(self, name: str) -> Tensor:
        # rules live for one backward pass: the lookup is done once per name
        cache = self.__dict__.setdefault("_params", {})
        if name not in cache:
            cache[name] = parameter(self.module, name)
        return cache[name]

    #: Whether the samples may sit on any axis of the input and output (the
    #: first of size ``N``), as for layers acting on the last axis only.
    flexible_batch_axis = False

    def batch_axis(self, shape: torch.Size) -> Optional[int]:
        """Axis of a tensor of this shape that holds the samples (``None``: none).

        Axis 0, or with :attr:`flexible_batch_axis` the first axis of size
        ``N`` (axis 0 wins when several match).
        """
        if self.flexible_batch_axis:
            axes = [axis for axis, size in enumerate(shape) if size == self.batch_size]
            return axes[0] if axes else None
        return 0 if len(shape) > 0 and shape[0] == self.batch_size else None

    def ambiguous_axes(self, call: ModuleCall) -> List[int]:
        """With :attr:`flexible_batch_axis`: the axes of ``call``'s first
        output, but its last (the features), that have size ``N`` when there
        are several (``[T, N, D]`` with ``T == N``), else ``[]``. The engine
        then finds the sample axis by a probe (:meth:`set_sample_axis`)."""
        if not self.flexible_batch_axis or not call.output_shapes:
            return []
        shape = call.output_shapes[0]
        axes = [axis for axis, size in enumerate(shape[:-1]) if size == self.batch_size]
        return axes if len(axes) > 1 else []

    def set_sample_axis(self, call: ModuleCall, axis: int) -> None:
        """Read the samples of ``call`` (its inputs and outputs) on ``axis``."""
        self.__dict__.setdefault("_first_axes", {})[id(call)] = axis

    def output_axes(self, call: ModuleCall) -> List[Optional[int]]:
        """Sample axis of each recorded output of ``call``."""
        return [self.batch_axis(shape) for shape in call.output_shapes]

    def batch_first(self, call: ModuleCall, tensor: Tensor, offset: int = 0) -> Tensor:
        """``tensor`` (an input, or columns with ``offset=1``) with samples first.

        Inputs and outputs of layers with :attr:`flexible_batch_axis` share the
        sample axis of the first output.
        """
        axes = self.__dict__.setdefault("_first_axes", {})  # rules live for one pass
        if id(call) not in axes:
            axes[id(call)] = self.output_axes(call)[0]
        axis = axes[id(call)]
        return tensor if not axis else tensor.movedim(axis + offset, offset)

    def check_batch(self, batch_size: int):
        """Remember ``N``; refuse outputs that reach the loss without a batch axis."""
        self.batch_size = batch_size
        for call in self.calls:
            axes = self.output_axes(call)
            for edge, shape, axis in zip(call.edges, call.output_shapes, axes):
                if edge is not None and axis is not None and shape[axis] != batch_size:
                    raise ValueError(
                        f"{self.module} holds its samples on axis {axis} of its output "
                        f"{tuple(shape)} (size {shape[axis]}), but the loss input has "
                        f"N={batch_size} samples. Is the loss computed on a time-major "
                        "tensor [T, N, ...] flattened to rows? curvext takes axis 0 of "
                        "the loss input (or of the tensor it flattens) as the samples: "
                        "move the samples there first (x.transpose(0, 1))."
                    )
                if edge is not None and axis is None:
                    raise ValueError(
                        f"{self.module} produced an output of shape {tuple(shape)} "
                        f"without the batch axis of the loss input (N={batch_size})"
                        f"{'' if self.flexible_batch_axis else ' first'}. curvext "
                        "needs every module with trainable parameters to be called "
                        "on a batch [N, ...], e.g. "
                        "pos_embedding(positions.expand(N, -1)) instead of "
                        "pos_embedding(positions)."
                    )

    def release(self):
        """Forget what was cached for the current chunk of columns."""

    # the one reduction every rule must provide
    def per_sample(self, name: str, grads: List[Tensor]) -> Tensor:
        """Per-sample vectors ``[K, N, *p.shape]`` (all calls summed)."""
        raise NotImplementedError

    def outer_product_vectors(self, name: str) -> bool:
        """Whether the per-sample vectors of ``name`` are outer products of an
        output side and an input side (``FactoredRule`` weights: ``inputs``,
        ``grad_factor``, ``outer``, ``kfac_factors(input_sum=...)`` apply)."""
        return False

    def output_curvature_diag(
        self, name: str, curvature: Tensor, per_sample: bool
    ) -> Optional[Tensor]:
        r""":math:`\sum_f d_{nf} (J_n^\top e_f)^2` summed over ``n`` (shape of
        ``p``) or not (``per_sample``: ``[N, *p.shape]``), for a diagonal
        curvature ``d [N, *output]`` at the output of the rule's only call:
        the Hessian term of an elementwise op applied to that output, without
        one column per output entry. ``None`` where the rule has no such
        shortcut (the engine then pushes the columns)."""
        return None

    def compact_diag(self, name: str) -> bool:
        r"""Whether :meth:`diag_weights` gives a compact form of the per-sample
        diagonal that adds up over columns and terms (Linear/Conv with one
        position: :math:`\sum_k G^2` ``[N, groups, d_grad]``), turned into the
        diagonal once by :meth:`diag_from_weights`."""
        return False

    def diag_weights(self, name: str, grads: List[Tensor]) -> Tensor:
        """The compact form of :meth:`compact_diag` for ``grads``."""
        raise NotImplementedError

    def curvature_weights(self, name: str, curvature: Tensor) -> Optional[Tensor]:
        """:meth:`output_curvature_diag` in the compact form of :meth:`diag_weights`."""
        return None

    def diag_from_weights(self, name: str, weights: Tensor, per_sample: bool) -> Tensor:
        """The diagonal (``[N, *p.shape]`` for ``per_sample``) from summed weights."""
        raise NotImplementedError

    def signed_diag(
        self, name: str, positive: List[Tensor], negative: List[Tensor], per_sample: bool
    ) -> Tensor:
        """:meth:`diag` (or :meth:`batch_diag` for ``per_sample``) of the
        ``positive`` columns minus that of the ``negative`` ones."""
        reduce = self.batch_diag if per_sample else self.diag
        return reduce(name, positive) - reduce(name, negative)

    # reductions derived from per_sample, chunked over columns
    def chunked(self, name: str, grads: List[Tensor], reduce) -> Tensor:
        """``reduce(per_sample(name, chunk))`` summed over chunks of columns
        small enough to materialise (``MAX_PER_SAMPLE_ELEMENTS``)."""
        num_cols = num_columns(grads[0])
        per_col = self.batch_size * self.param(name).numel()
        step = max(1, MAX_PER_SAMPLE_ELEMENTS // max(per_col, 1))
        if step >= num_cols:  # the same grads objects let rules reuse their work
            return reduce(self.per_sample(name, grads))
        result = None
        for start in range(0, num_cols, step):
            chunk = [slice_columns(g, start, start + step) for g in grads]
            part = reduce(self.per_sample(name, chunk))
            result = part if result is None else result + part
        return result

    def diag(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_{n,k} v_{nk}^2`, shape of ``p``."""
        return self.chunked(name, grads, lambda v: v.square().sum((0, 1)))

    def batch_diag(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_k v_{nk}^2`, ``[N, *p.shape]``."""
        return self.chunked(name, grads, lambda v: v.square().sum(0))

    def batch_l2(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_k \|v_{nk}\|^2`, ``[N]``."""
        return self.chunked(name, grads, lambda v: v.square().reshape(*v.shape[:2], -1).sum((0, 2)))

    def sample_sum(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_n v_{nk}`, ``[K, *p.shape]``."""
        return self.chunked(name, grads, lambda v: v.sum(1))

    def sum_norm_sq(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\|\sum_n v_{nk}\|^2`, ``[K]``, accumulated in float64 (at least)."""
        total = self.sample_sum(name, grads).flatten(1)
        dtype = torch.promote_types(total.dtype, torch.float64)
        return torch.linalg.vector_norm(total, dim=1, dtype=dtype).square()

    # Gram matrix (GGN eigenpairs). A "Gram factor" is whatever represents
    # the per-sample vectors of one chunk of columns, with the columns on
    # axis 0 so that the factors of chunks concatenate; only the rule that
    # made it reads it.
    def gram_factor(self, name: str, grads: List[Tensor]) -> Tensor:
        """Representation ``[K, N, ...]`` of the per-sample vectors (default:
        the vectors themselves, flattened, ``[K, N, P]``)."""
        vectors = self.per_sample(name, grads)
        return vectors.reshape(*vectors.shape[:2], -1)

    def gram(self, name: str, factor: Tensor) -> Tensor:
        r"""Gram block :math:`[v_{nk} \cdot v_{n'k'}]`, ``[K N, K N]``, rows
        ordered ``k * N + n``."""
        size = factor.shape[0] * factor.shape[1]
        return self.add_gram({name: factor}, factor.new_zeros(size, size))

    def add_gram(self, factors: Dict[str, Tensor], out: Tensor) -> Tensor:
        r"""Add the Gram blocks of several of the rule's parameters to ``out``.

        Args:
            factors: Gram factor of each parameter (name → factor).
            out: ``[K N, K N]``, updated in place (it may have a wider dtype
                than the factors).

        Returns:
            ``out``. Rules override it where parameters share work (the weight
            and the bias of a layer see the same columns).
        """
        for factor in factors.values():
            flat = factor.flatten(0, 1)
            if flat.dtype == out.dtype:
                out.addmm_(flat, flat.T)
            else:
                out.add_(flat @ flat.T)
        return out

    def gram_dots(self, name: str, factor: Tensor, matrix: Tensor) -> Tensor:
        r""":math:`v_{nk} \cdot m_j` for each ``m_j`` of ``matrix [J, *p.shape]``,
        ``[K N, J]`` (rows ``k * N + n``, as :meth:`gram`'s)."""
        flat = factor.flatten(0, 1)
        return flat @ matrix.to(flat.dtype).reshape(matrix.shape[0], -1).T

    def gram_vectors(self, name: str, factor: Tensor, coefficients: Tensor) -> Tensor:
        r""":math:`\sum_{nk} c_{nk,j} v_{nk}` for each column ``j`` of
        ``coefficients [K N, J]``, ``[J, *p.shape]``."""
        flat = factor.flatten(0, 1)
        return (coefficients.T.to(flat.dtype) @ flat).reshape(-1, *self.param(name).shape)

    # Kronecker factors
    def kfac_grad_factor(self, name: str, grads: List[Tensor], approx: str) -> Tensor:
        r"""Output-side factor :math:`\sum g g^\top` (summable over column chunks).

        Without Kronecker structure, the whole GGN block :math:`\sum_{nk}
        \mathrm{vec}(v_{nk}) \mathrm{vec}(v_{nk})^\top`.
        """

        def outer(v):
            flat = v.reshape(v.shape[0] * v.shape[1], -1)
            return flat.T @ flat

        param = self.param(name)
        check_dense_factor(self.module, name, param.numel(), param.dtype, "its exact GGN block")
        return self.chunked(name, grads, outer)

    def kfac_grad_dim(self, name: str) -> int:
        """Size of the output-side factor (for ``forward-only``: identity)."""
        return self.param(name).numel()

    def kfac_input_factor(self, name: str, approx: str) -> Optional[Tensor]:
        """Input-side factor, or ``None`` if the parameter has a single factor."""
        return None

    def kfac_factors(self, name: str, grad_factor: Tensor, approx: str) -> List[Tensor]:
        """The factors in the order in which ``torch.kron`` matches ``p.flatten()``."""
        input_factor = self.kfac_input_factor(name, approx)
        return [grad_factor] if input_factor is None else [grad_factor, input_factor]


def num_columns(call_grads) -> int:
    """``K`` of one call's columns (a tensor, or a tuple for several outputs)."""
    return (call_grads[0] if isinstance(call_grads, tuple) else call_grads).shape[0]


def slice_columns(call_grads, start: int, stop: int):
    """Columns ``start:stop`` of one call's columns (the columns themselves
    when that is all of them)."""
    first = call_grads[0] if isinstance(call_grads, tuple) else call_grads
    if start == 0 and stop >= first.shape[0]:
        return call_grads
    if isinstance(call_grads, tuple):
        return tuple(g[start:stop] for g in call_grads)
    return call_grads[start:stop]


def parameter(module: nn.Module, name: str) -> Tensor:
    """``module.get_parameter(name)``, without its walk for an own parameter."""
    own = module._parameters.get(name)
    return own if own is not None else module.get_parameter(name)


def first_parameter(module: nn.Module) -> Optional[Tensor]:
    """``next(module.parameters(), None)``, without the walk when ``module``
    owns a parameter (its own come first in that order)."""
    for param in module._parameters.values():
        if param is not None:
            return param
    return next(module.parameters(), None)


def own_trainable(module: nn.Module) -> List[str]:
    """Names of the trainable parameters ``module`` owns directly."""
    return [name for name, p in module._parameters.items() if p is not None and p.requires_grad]
