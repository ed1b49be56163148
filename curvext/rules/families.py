r"""What an extension may ask a rule: one typed protocol per family.

A rule (:class:`~curvext.rules.base.ModuleRule` and its subclasses) exposes
the per-sample vectors :math:`v_{nk} = J_n^\top s_{nk}` of a module's
parameters (``K`` columns ``s`` pushed back to the module's outputs, ``N``
samples) through reductions, grouped in families. An extension is typed
with the family it reads, so what it needs from a layer is a declared,
public method:

- :class:`PerSampleRule` — every rule: :meth:`per_sample` (the one method a
  new rule must write) and the reductions ``ModuleRule`` derives from it
  (``diag``, ``batch_diag``, ``batch_l2``, ``sample_sum``, ``sum_norm_sq``,
  ``chunked``). GGN diagonals, first-order statistics, square roots.
- :class:`GramRule` — the Gram matrix of the per-sample vectors, their dot
  products with given vectors and the map back to parameter space (GGN
  eigenpairs, block products ``GGNMP``); derived from ``per_sample`` by
  default, factored by the Linear/Conv rules.
- :class:`KroneckerRule` — the KFAC factors; without Kronecker structure
  the whole GGN block is the single factor (derived by default).
- :class:`OuterProductRule` — rules whose weights' per-sample vectors are
  outer products of an output side and an input side
  (:meth:`outer_product_vectors` is ``True`` for that parameter: Linear and
  Conv weights); EKFAC's rotated corrections and the data-set passes that
  keep a running input factor read the two sides separately.

``ModuleRule`` implements the first three for any module from
``per_sample``; ``FactoredRule`` implements all four. The protocols are
for reading and type checking (``typing.Protocol``): an extension asks
:meth:`PerSampleRule.outer_product_vectors` before it treats a rule as an
:class:`OuterProductRule`, never ``isinstance`` on rule classes.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Protocol, Tuple

from torch import Tensor, nn

from curvext.recording import ModuleCall

#: The gradients w.r.t. a rule's recorded outputs, one entry per call (columns first).
Grads = List[Tensor]


class PerSampleRule(Protocol):
    """Every rule: the per-sample vectors and the reductions derived from them."""

    module: nn.Module
    calls: List[ModuleCall]
    #: ``N``, set before any reduction.
    batch_size: int

    def param_names(self) -> List[str]:
        """Names (dotted, relative to :attr:`module`) of the parameters handled."""

    def param(self, name: str) -> Tensor:
        """The parameter ``name``."""

    def per_sample(self, name: str, grads: Grads) -> Tensor:
        """Per-sample vectors ``[K, N, *p.shape]`` (all calls summed)."""

    def outer_product_vectors(self, name: str) -> bool:
        """Whether the rule is an :class:`OuterProductRule` for ``name``."""

    def chunked(self, name: str, grads: Grads, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        """``reduce(per_sample(...))`` summed over column chunks small enough to materialise."""

    def diag(self, name: str, grads: Grads) -> Tensor:
        r""":math:`\sum_{n,k} v_{nk}^2`, ``p.shape``."""

    def batch_diag(self, name: str, grads: Grads) -> Tensor:
        r""":math:`\sum_k v_{nk}^2`, ``[N, *p.shape]``."""

    def batch_l2(self, name: str, grads: Grads) -> Tensor:
        r""":math:`\sum_k \|v_{nk}\|^2`, ``[N]``."""

    def sample_sum(self, name: str, grads: Grads) -> Tensor:
        r""":math:`\sum_n v_{nk}`, ``[K, *p.shape]``."""

    def sum_norm_sq(self, name: str, grads: Grads) -> Tensor:
        r""":math:`\|\sum_n v_{nk}\|^2`, ``[K]``."""

    def compact_diag(self, name: str) -> bool:
        """Whether the rule has a compact summable form of the per-sample diagonal."""

    def diag_weights(self, name: str, grads: Grads) -> Tensor:
        """That compact form (:meth:`compact_diag`)."""

    def curvature_weights(self, name: str, curvature: Tensor) -> Optional[Tensor]:
        """:meth:`output_curvature_diag` in the form of :meth:`diag_weights`."""

    def diag_from_weights(self, name: str, weights: Tensor, per_sample: bool) -> Tensor:
        """The diagonal from summed :meth:`diag_weights`."""

    def signed_diag(self, name: str, positive: Grads, negative: Grads, per_sample: bool) -> Tensor:
        """``diag`` (``batch_diag`` for ``per_sample``) of ``positive`` minus ``negative``."""

    def output_curvature_diag(
        self, name: str, curvature: Tensor, per_sample: bool
    ) -> Optional[Tensor]:
        r""":math:`\sum_f d_{nf} (J_n^\top e_f)^2` for a diagonal curvature
        ``d [N, *output]`` at the output of the rule's only call (summed over
        ``n`` unless ``per_sample``), or ``None`` without a shortcut."""

    def release(self) -> None:
        """Forget what was cached for the current chunk of columns."""


class GramRule(PerSampleRule, Protocol):
    """The Gram matrix of the per-sample vectors, and the way back (GGN eigenpairs)."""

    def gram_factor(self, name: str, grads: Grads) -> Tensor:
        """What represents one chunk's per-sample vectors, ``[K, N, ...]``."""

    def gram(self, name: str, factor: Tensor) -> Tensor:
        r"""Gram block :math:`[v_{nk} \cdot v_{n'k'}]`, ``[K N, K N]``."""

    def add_gram(self, factors: Dict[str, Tensor], out: Tensor) -> Tensor:
        """Add the Gram blocks of several parameters of the rule to ``out`` (in place)."""

    def gram_dots(self, name: str, factor: Tensor, matrix: Tensor) -> Tensor:
        r""":math:`v_{nk} \cdot m_j` per ``m_j`` of ``matrix [J, *p.shape]``, ``[K N, J]``."""

    def gram_vectors(self, name: str, factor: Tensor, coefficients: Tensor) -> Tensor:
        r""":math:`\sum_{nk} c_{nk,j} v_{nk}` per column ``j`` of ``coefficients
        [K N, J]``, ``[J, *p.shape]``."""


class KroneckerRule(PerSampleRule, Protocol):
    """KFAC's factors (one factor, the whole GGN block, without Kronecker structure)."""

    def kfac_grad_factor(self, name: str, grads: Grads, approx: str) -> Tensor:
        r"""Output-side factor :math:`\sum g g^\top`, summable over column chunks."""

    def kfac_grad_dim(self, name: str) -> int:
        """Size of the output-side factor (``forward-only``: an identity of this size)."""

    def kfac_input_factor(self, name: str, approx: str) -> Optional[Tensor]:
        """Input-side factor, or ``None`` for a single-factor parameter."""

    def kfac_factors(self, name: str, grad_factor: Tensor, approx: str) -> List[Tensor]:
        """The factors in the order in which ``torch.kron`` matches ``p.flatten()``."""


class OuterProductRule(KroneckerRule, GramRule, Protocol):
    """Rules whose weights' per-sample vectors are ``outer(grad side, input side)``."""

    #: Whether the weight's leading axis belongs to the output side
    #: (``[out, in, ...]``: Linear, Conv) or the input side (ConvTranspose).
    grad_first: bool

    def inputs(self) -> Tensor:
        """The input side ``A [N, groups, d_in, T]`` of all calls (``T`` positions)."""

    def replace_inputs(self, inputs: Tensor) -> None:
        """Use ``inputs`` as the input side from now on (EKFAC's rotated inputs)."""

    def grad_factor(self, name: str, grads: Grads) -> Tensor:
        """The output side ``G [K, N, groups, d_grad, T]`` of one chunk (weight or bias)."""

    def single_position(self, name: str = "weight") -> bool:
        """Whether ``T = 1`` (no weight sharing, one call: Linear on ``[N, d]``)."""

    def outer(self, grad_side: Tensor, input_side: Tensor) -> Tensor:
        """Per-sample vectors ``[K, N, groups, ., .]`` in the weight's layout."""

    def squares(self, name: str, grads: Grads) -> Tuple[Tensor, Optional[Tensor]]:
        """The squared output and input sides (the diagonal without the vectors)."""

    def kfac_factors(
        self,
        name: str,
        grad_factor: Tensor,
        approx: str,
        input_sum: Optional[Tensor] = None,
        weight: float = 1.0,
    ) -> List[Tensor]:
        """The factors in the weight's order; with ``input_sum`` the input factor
        is ``input_sum + weight · A`` computed in place (a running sum over batches)."""


__all__ = ["Grads", "GramRule", "KroneckerRule", "OuterProductRule", "PerSampleRule"]
