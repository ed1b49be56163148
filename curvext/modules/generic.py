r"""Rule for any module with parameters that has no dedicated rule.

Per-sample vectors :math:`v_{nk} = J_{\theta}(x_n)^\top g_{nk}` by
``torch.func``: one ``vjp`` of the module's functional form per sample
(``vmap`` over samples), applied to all columns (``vmap`` over columns).
Exact for any module that treats samples independently, but it re-runs the
module's forward per sample and materialises ``[K, N, *p.shape]``, so it is
slower than a dedicated rule; curvext says so once per module type.

Modules that ``vmap`` cannot run (``LSTM``/``GRU``, whose fused kernels
allocate their own hidden state) fall back to a loop over samples and
columns with plain autograd: still exact, slower again.

The sample axis of every input and output is the first axis of size ``N``
(the second one first for modules with ``batch_first=False``, like
time-major RNNs, whose hidden states ``[layers, N, H]`` also have it second).
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvext.modules.base import ModuleRule

_NOTED = set()


class CurvextNote(UserWarning):
    """A one-time note about how curvext handles a module."""


def note_once(key, message: str):
    """Warn with ``message`` (a :class:`CurvextNote`) the first time ``key`` is seen."""
    if key not in _NOTED:
        _NOTED.add(key)
        warnings.warn(message, CurvextNote, stacklevel=3)


class GenericRule(ModuleRule):
    """Exact per-sample vectors for any module, through ``torch.func``."""

    def check(self):
        note_once(
            type(self.module),
            f"curvext has no dedicated rule for {type(self.module).__name__}; its "
            "parameters use the generic torch.func rule (exact, but it re-runs the "
            "module per sample and is slower).",
        )

    def batch_axis(self, shape) -> Optional[int]:
        """The first axis of size ``N`` (second first if ``batch_first=False``)."""
        axes = [axis for axis, size in enumerate(shape) if size == self.batch_size]
        if getattr(self.module, "batch_first", True) is False and 1 in axes:
            return 1
        return axes[0] if axes else None

    def input_axes(self, call, leaves) -> List[Optional[int]]:
        """Sample axis of each flattened input (``None``: shared by all samples)."""
        return [
            self.batch_axis(leaf.shape) if isinstance(leaf, Tensor) else None
            for leaf in leaves
        ]

    def _call_per_sample(self, call, names: List[str], grads) -> List[Tensor]:
        """Per-sample vectors ``[K, N, *p.shape]`` of one call, per name.

        ``grads`` holds one ``[K, *output.shape]`` tensor per recorded output.
        """
        # outputs that do not reach the loss have zero columns: leave them out
        reached = [i for i, edge in enumerate(call.edges) if edge is not None]
        all_out_axes = self.output_axes(call)
        out_axes = [all_out_axes[i] for i in reached]
        grads = grads if isinstance(grads, tuple) else (grads,)
        grads = tuple(grads[i].movedim(a + 1, 1) for i, a in zip(reached, out_axes))
        leaves, spec = tree_flatten((call.args, call.kwargs))
        in_axes = self.input_axes(call, leaves)
        params = {name: self.param(name).detach() for name in names}

        def forward(sample_params, sample_leaves):
            full = [
                leaf if axis is None else leaf.unsqueeze(axis)
                for leaf, axis in zip(sample_leaves, in_axes)
            ]
            args, kwargs = tree_unflatten(full, spec)
            outputs = floating_outputs(functional_call(self.module, sample_params, args, kwargs))
            return tuple(outputs[i].squeeze(a) for i, a in zip(reached, out_axes))

        def sample_vjp(sample_leaves, sample_grads):
            _, pullback = vjp(lambda p: forward(p, sample_leaves), params)
            return vmap(lambda cols: pullback(cols)[0])(sample_grads)

        try:
            # the math kernel of scaled_dot_product_attention has batching rules
            with sdpa_kernel(SDPBackend.MATH):
                per_sample = vmap(sample_vjp, in_dims=(in_axes, 1), out_dims=1)(
                    leaves, grads
                )
        except RuntimeError as error:
            note_once(
                ("loop", type(self.module)),
                f"torch.func.vmap cannot run {type(self.module).__name__} ({error}); "
                "curvext loops over samples and columns for it instead (exact, slow).",
            )
            per_sample = self._loop_per_sample(forward, params, leaves, in_axes, grads)
        return [per_sample[name] for name in names]

    def _loop_per_sample(self, forward, params, leaves, in_axes, grads):
        """Fallback of :meth:`_call_per_sample` with plain autograd."""
        num_cols = grads[0].shape[0]
        result = {
            name: p.new_zeros(num_cols, self.batch_size, *p.shape) for name, p in params.items()
        }
        trainable = {name: p.detach().requires_grad_() for name, p in params.items()}
        for n in range(self.batch_size):
            sample_leaves = [
                leaf if axis is None else leaf.select(axis, n)
                for leaf, axis in zip(leaves, in_axes)
            ]
            with torch.enable_grad():
                outputs = forward(trainable, sample_leaves)
                for k in range(num_cols):
                    vectors = torch.autograd.grad(
                        outputs,
                        list(trainable.values()),
                        [g[k, n] for g in grads],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for name, vector in zip(trainable, vectors):
                        if vector is not None:
                            result[name][k, n] = vector
        return result

    def per_sample(self, name, grads):
        # one vjp gives every parameter's vectors: compute them once per chunk
        key = tuple(id(g) for g in grads)
        last = getattr(self, "_last", None)
        if last is None or last[0] != key:
            names = self.param_names()
            totals = [0] * len(names)
            for call, call_grads in zip(self.calls, grads, strict=True):
                vectors = self._call_per_sample(call, names, call_grads)
                totals = [total + v for total, v in zip(totals, vectors)]
            last = (key, grads, dict(zip(names, totals)))  # grads kept alive for the key
            self._last = last
        return last[2][name]

    def release(self):
        self._last = None


def floating_outputs(output) -> List[Tensor]:
    """Floating-point tensors of a module output, in the order of
    :func:`curvext.recording.graph_outputs` (inside ``torch.func`` every
    floating output is part of the graph)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in floating_outputs(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in floating_outputs(o)]
    return []


class RecurrentRule(GenericRule):
    """``RNN``/``LSTM``/``GRU``: the generic rule with the sample axes these
    modules define (sequence input and output: 0 if ``batch_first`` else 1;
    hidden states ``[layers, N, H]``: 1), never guessed from sizes."""

    def _sequence_axis(self) -> int:
        return 0 if self.module.batch_first else 1

    def check(self):
        super().check()
        for call in self.calls:
            if not isinstance(call.args[0], Tensor):
                raise NotImplementedError(
                    f"{self.module} was called on a {type(call.args[0]).__name__}; "
                    "curvext supports recurrent layers on padded tensors only. "
                    "Pad the sequences instead of packing them."
                )

    def input_axes(self, call, leaves):
        sequence = self._sequence_axis()
        return [
            None if not isinstance(leaf, Tensor) else (sequence if index == 0 else 1)
            for index, leaf in enumerate(leaves)
        ]

    def output_axes(self, call):
        sequence = self._sequence_axis()
        return [sequence] + [1] * (len(call.output_shapes) - 1)
