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

from typing import List, Optional

import torch
from torch import Tensor, nn

from curvext.recording import ModuleCall

#: Largest number of elements of per-sample vectors materialised at once by
#: the default reductions (they loop over chunks of columns beyond that).
MAX_PER_SAMPLE_ELEMENTS = 2**26


class ModuleRule:
    """Reductions of the per-sample vectors of one module's parameters.

    Args:
        module: The module.
        calls: Its recorded calls in this forward pass (several for tied
            weights), each with detached inputs.
    """

    def __init__(self, module: nn.Module, calls: List[ModuleCall]):
        self.module = module
        self.calls = calls
        self.check()

    def check(self):
        """Raise if the module is configured in a way the rule cannot handle."""

    @property
    def batch_size(self) -> int:
        return self.calls[0].output_shapes[0][0]

    def param_names(self) -> List[str]:
        """Names of the module's own trainable parameters."""
        return [
            name
            for name, p in self.module._parameters.items()
            if p is not None and p.requires_grad
        ]

    def param(self, name: str) -> Tensor:
        return self.module._parameters[name]

    # the one reduction every rule must provide
    def per_sample(self, name: str, grads: List[Tensor]) -> Tensor:
        """Per-sample vectors ``[K, N, *p.shape]`` (all calls summed)."""
        raise NotImplementedError

    # reductions derived from per_sample, chunked over columns
    def _chunked(self, name: str, grads: List[Tensor], reduce) -> Tensor:
        num_cols = grads[0].shape[0]
        per_col = self.batch_size * self.param(name).numel()
        step = max(1, MAX_PER_SAMPLE_ELEMENTS // max(per_col, 1))
        result = None
        for start in range(0, num_cols, step):
            part = reduce(self.per_sample(name, [g[start : start + step] for g in grads]))
            result = part if result is None else result + part
        return result

    def diag(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_{n,k} v_{nk}^2`, shape of ``p``."""
        return self._chunked(name, grads, lambda v: v.square().sum((0, 1)))

    def batch_diag(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_k v_{nk}^2`, ``[N, *p.shape]``."""
        return self._chunked(name, grads, lambda v: v.square().sum(0))

    def batch_l2(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_k \|v_{nk}\|^2`, ``[N]``."""
        return self._chunked(
            name, grads, lambda v: v.square().reshape(*v.shape[:2], -1).sum((0, 2))
        )

    def sample_sum(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_n v_{nk}`, ``[K, *p.shape]``."""
        return self._chunked(name, grads, lambda v: v.sum(1))

    # Kronecker factors
    def kfac_grad_factor(self, name: str, grads: List[Tensor], approx: str) -> Tensor:
        r"""Output-side factor :math:`\sum g g^\top` (summable over column chunks).

        Without Kronecker structure, the whole GGN block :math:`\sum_{nk}
        \mathrm{vec}(v_{nk}) \mathrm{vec}(v_{nk})^\top`.
        """

        def outer(v):
            flat = v.reshape(v.shape[0] * v.shape[1], -1)
            return flat.T @ flat

        return self._chunked(name, grads, outer)

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


def identity(size: int, like: Tensor) -> Tensor:
    return torch.eye(size, dtype=like.dtype, device=like.device)
