r"""Rule for any module with parameters that has no dedicated rule.

Per-sample vectors :math:`v_{nk} = J_{\theta}(x_n)^\top g_{nk}` by
``torch.func``: one ``vjp`` of the module's functional form per sample
(``vmap`` over samples), applied to all columns (``vmap`` over columns).
Exact for any module that treats samples independently, but it re-runs the
module's forward per sample and materialises ``[K, N, *p.shape]``, so it is
slower than a dedicated rule; curvext says so once per module type.
"""

from __future__ import annotations

import warnings
from typing import List

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap

from curvext.modules.base import ModuleRule

_NOTED_TYPES = set()


class CurvextNote(UserWarning):
    """A one-time note about how curvext handles a module."""


class GenericRule(ModuleRule):
    """Exact per-sample vectors for any module, through ``torch.func``."""

    def check(self):
        module_type = type(self.module)
        if module_type not in _NOTED_TYPES:
            _NOTED_TYPES.add(module_type)
            warnings.warn(
                f"curvext has no dedicated rule for {module_type.__name__}; its "
                "parameters use the generic torch.func rule (exact, but it re-runs "
                "the module per sample and is slower).",
                CurvextNote,
                stacklevel=2,
            )

    def _call_per_sample(self, call, names: List[str], grads: List[Tensor]) -> List[Tensor]:
        """Per-sample vectors ``[K, N, *p.shape]`` of one call, per name."""
        batch = self.batch_size
        leaves, spec = torch.utils._pytree.tree_flatten((call.args, call.kwargs))
        batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch for t in leaves]
        params = {name: self.param(name).detach() for name in names}

        def sample_vjp(sample_leaves, sample_grads):
            def forward(sample_params):
                full = [
                    leaf.unsqueeze(0) if is_batched else leaf
                    for leaf, is_batched in zip(sample_leaves, batched)
                ]
                args, kwargs = torch.utils._pytree.tree_unflatten(full, spec)
                outputs = graph_outputs_like(
                    functional_call(self.module, sample_params, args, kwargs)
                )
                return tuple(out.squeeze(0) for out in outputs)

            _, pullback = vjp(forward, params)
            return vmap(lambda cols: pullback(cols)[0])(sample_grads)

        in_dims = ([0 if b else None for b in batched], 1)
        per_sample = vmap(sample_vjp, in_dims=in_dims, out_dims=1)(leaves, tuple(grads))
        return [per_sample[name] for name in names]

    def per_sample(self, name, grads):
        total = 0
        for call, call_grads in zip(self.calls, grads):
            # grads of a call: one tensor per recorded output
            outputs = call_grads if isinstance(call_grads, (tuple, list)) else [call_grads]
            total = total + self._call_per_sample(call, [name], outputs)[0]
        return total


def graph_outputs_like(output) -> List[Tensor]:
    """Tensor outputs in the order :func:`curvext.recording.graph_outputs` uses.

    Inside ``torch.func`` transforms every output is part of the graph, so
    floating-point tensors are kept and integer ones dropped.
    """
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in graph_outputs_like(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in graph_outputs_like(o)]
    return []


