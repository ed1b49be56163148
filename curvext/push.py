"""One batched backward pass: columns from one gradient edge to every
recorded module output (used by the engine for the loss columns and by
:mod:`curvext.curvature_terms` for the Hessian's second-order columns)."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from curvext.recording import ModuleCall
from curvext.rules.base import first_parameter
from curvext.rules.generic import note_once

#: Bytes of module-output gradients that one chunk of columns may hold when
#: ``backpack(max_columns=None)`` (at least one column per chunk). Small on
#: purpose: the batched backward (``is_grads_batched``, PyTorch's legacy vmap)
#: has no batching rule for ``convolution_backward`` or
#: ``max_pool2d_with_indices_backward`` and loops over the columns there, then
#: copies the results into one tensor; and every column held at once costs
#: its gradients and the backward's intermediates (several times the module
#: outputs). Measured on CPU (10 batches of 128, type-2 KFAC, 9 columns): the
#: benchmark CNN (7.5 MB of outputs per column) took 850 ms with one column
#: per backward and 1550 ms with all 9 in one, with 58 MB instead of 226 MB
#: peak memory; the MLP (0.2 MB per column) stays in one chunk, where batching
#: beats nine plain backward passes (93 ms vs 120 ms).
CHUNK_BYTES = 2**23


_ENGINE = torch.autograd.Variable._execution_engine


def backpropagate(
    edge: GradientEdge, calls: List[ModuleCall], columns: Tensor, dtype: torch.dtype
) -> Dict[int, object]:
    """Gradients ``[k, N, ...]`` of every recorded output of ``calls``, keyed by
    ``id(call)``; a call with several outputs gets a tuple.

    Each call's columns are cast to the dtype of its module's parameters
    (under autocast, bfloat16 gradients meet float32 inputs and weights).
    """
    edges = [e for call in calls for e in call.edges if e is not None]
    if columns.dtype != dtype:
        columns = columns.to(dtype)
    # a plain backward avoids vmap's overhead (with no edge the engine would
    # accumulate into .grad instead: torch.autograd.grad refuses that case)
    single = columns.shape[0] == 1 and bool(edges)

    def backward(grad_output: Tensor, batched: bool):
        return torch.autograd.grad(
            [edge],
            edges,
            grad_outputs=[grad_output],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )

    if single:
        # the engine directly: torch.autograd.grad's argument checks and
        # conversions cost more than this backward on small models, and
        # these arguments are valid by construction (one edge, a column
        # shaped like its tensor, edges of this graph)
        column = columns[0]
        results = _ENGINE.run_backward((edge,), (column,), True, False, tuple(edges), True, False)
        results = [None if r is None else r.unsqueeze(0) for r in results]
    else:
        try:
            results = backward(columns, True)
        except RuntimeError as error:
            # a backward without batching rule (a custom autograd.Function
            # calling detach, say): one plain backward per column, still exact
            note_once(
                ("columns", str(error)[:80]),
                f"The batched backward of curvext failed ({error}); it backpropagates "
                "one column at a time instead (exact, slower). backpack(max_columns=1) "
                "skips the attempt.",
            )
            per_column = [backward(column, False) for column in columns]
            results = [
                None if parts[0] is None else torch.stack(parts) for parts in zip(*per_column)
            ]
    results = iter(results)
    num_cols = columns.shape[0]
    call_grads: Dict[int, object] = {}
    for call in calls:
        param = first_parameter(call.module)
        call_dtype = param.dtype if param is not None and param.is_floating_point() else dtype
        outputs = []
        for output_edge, shape in zip(call.edges, call.output_shapes, strict=True):
            result = next(results) if output_edge is not None else None
            if result is None:
                result = columns.new_zeros(num_cols, *shape)
            outputs.append(result if result.dtype == call_dtype else result.to(call_dtype))
        call_grads[id(call)] = outputs[0] if len(outputs) == 1 else tuple(outputs)
    return call_grads


__all__ = ["CHUNK_BYTES", "backpropagate"]
