r"""Columns → one batched backward → module rules → extensions.

When ``loss.backward()`` reaches the input of an extended loss inside a
:class:`curvext.backpack` context, :class:`LossCall` runs :func:`run`:

1. find the recorded module calls in the graph of this loss
   (:func:`curvext.recording.collect_calls`);
2. build the columns every active extension needs (exact square root, MC
   samples, the loss gradient) as one tensor ``[K, *loss_input.shape]``;
3. push them through the graph in one ``torch.autograd.grad(...,
   is_grads_batched=True)`` per chunk of columns, obtaining ``[K, N, ...]``
   at every recorded module output: through residual connections,
   attention, reshapes, in-place activations, anything autograd can
   differentiate;
4. let each extension reduce each parameter's columns with the parameter's
   module rule, and store the results on the parameters.

The ordinary backward then continues and fills ``.grad`` as usual.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from curvext.context import active_extensions, current_run_log, max_columns_per_backward
from curvext.extensions.base import Extension, RunInfo, sum_partials
from curvext.losses import LossRule, loss_rule
from curvext.coverage import assign
from curvext.modules.base import slice_columns
from curvext.recording import ModuleCall, collect_calls

#: Bytes of module-output gradients that one chunk of columns may hold when
#: ``backpack(max_columns=None)``.
CHUNK_BYTES = 2**30

_engine = threading.local()


class LossCall:
    """One call of an extended loss; its hook starts the engine.

    Args:
        module: The loss module.
        loss_input: The prediction passed to the loss (in the graph).
        target: The target.
    """

    def __init__(self, module: nn.Module, loss_input: Tensor, target):
        self.module = module
        self.input = loss_input.detach()
        self.target = target.detach() if isinstance(target, Tensor) else target
        self.edge = get_gradient_edge(loss_input)
        self._handle = loss_input.register_hook(self._on_grad)

    def install(self):
        """Nothing more to do: the hook is registered on construction."""
        return self

    def _on_grad(self, grad: Tensor):
        if getattr(_engine, "running", False):
            return None
        extensions = active_extensions()
        if not extensions:
            return None
        _engine.running = True
        try:
            run(self, grad.detach(), extensions)
        finally:
            _engine.running = False
        run_log = current_run_log()
        if run_log is not None:
            run_log.append(type(self.module).__name__)
        return None


def _check_calls(calls: List[ModuleCall]):
    for call in calls:
        if call.couples_samples:
            raise RuntimeError(
                f"{call.module} normalises with batch statistics (train mode), which "
                "couples the samples of a batch, so per-sample curvature is not "
                "defined. Call model.eval() (BatchNorm then uses its running "
                "statistics) or replace BatchNorm with GroupNorm/LayerNorm."
            )


def _column_sizes(sets: List[tuple], loss: LossRule) -> List[int]:
    sizes = []
    for key in sets:
        if key[0] == "exact":
            sizes.append(loss.num_exact_columns)
        elif key[0] == "mc":
            sizes.append(key[1])
        else:
            sizes.append(1)
    return sizes


def _chunk_size(calls: List[ModuleCall], loss: LossRule, total: int) -> int:
    requested = max_columns_per_backward()
    if requested is not None:
        return requested
    itemsize = loss.input.element_size()
    bytes_per_column = itemsize * (
        loss.input.numel() + sum(s.numel() for c in calls for s in c.output_shapes)
    )
    return max(1, min(total, CHUNK_BYTES // max(bytes_per_column, 1)))


def run(loss_call: LossCall, grad: Tensor, extensions: Tuple[Extension, ...]):
    """Compute ``extensions`` for the loss call whose input gradient is ``grad``."""
    loss = loss_rule(loss_call.module, loss_call.input, loss_call.target)
    calls, consumers = collect_calls(loss_call.edge.node)
    try:
        _run(loss_call, loss, calls, consumers, grad, extensions)
    finally:
        for call in calls:  # the edges hold graph nodes: release them now
            call.edges = []


def _run(loss_call, loss, calls, consumers, grad, extensions):
    loss_name = type(loss_call.module).__name__
    if not calls:
        raise RuntimeError(
            f"The graph of the {loss_name} input contains no call of an extended "
            "module with trainable parameters. Call `model = extend(model)` "
            "before the forward pass, outside of curvext.disable()."
        )
    _check_calls(calls)
    targets = assign(calls, consumers, loss.batch_size)
    info = RunInfo(batch_size=loss.batch_size, normalization=loss.normalization)

    sets = list(OrderedDict.fromkeys(
        ext.column_set() for ext in extensions if ext.column_set() is not None
    ))
    sizes = _column_sizes(sets, loss)
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    mc_columns = _draw_mc_columns(sets, loss)

    partials: Dict[Tuple[int, int], object] = {}
    edges = [edge for call in calls for edge in call.edges]
    total = offsets[-1]
    step = _chunk_size(calls, loss, total) if total else 1
    for start in range(0, total, step):
        stop = min(start + step, total)
        columns = _columns(sets, offsets, start, stop, loss, mc_columns, grad)
        call_grads = _backpropagate(loss_call, calls, edges, columns)
        for set_index, key in enumerate(sets):
            lo, hi = max(start, offsets[set_index]), min(stop, offsets[set_index + 1])
            if lo >= hi:
                continue
            set_grads = {
                key_id: slice_columns(g, lo - start, hi - start) for key_id, g in call_grads.items()
            }
            for ext_index, ext in enumerate(extensions):
                if ext.column_set() != key:
                    continue
                for target_index, target in enumerate(targets):
                    partial = ext.reduce(target.rule, target.name, target.grads(set_grads))
                    slot = (ext_index, target_index)
                    if slot not in partials:
                        partials[slot] = partial
                    elif ext.combine == "cat":
                        partials[slot] = torch.cat([partials[slot], partial])
                    else:
                        partials[slot] = sum_partials(partials[slot], partial)

    for ext_index, ext in enumerate(extensions):
        for target_index, target in enumerate(targets):
            partial = partials.get((ext_index, target_index))
            value = ext.finalize(target.rule, target.name, partial, info)
            setattr(target.param, ext.savefield, value)


def _draw_mc_columns(sets: List[tuple], loss: LossRule) -> Dict[tuple, Tensor]:
    """MC columns of every ``("mc", M)`` set.

    One seed is drawn from the global CPU generator per backward pass, so
    MC results are reproducible under ``torch.manual_seed`` and the user's
    random stream advances by the same amount whatever the number of
    samples or the batch size. Each set gets its own generator seeded from
    it, so an extension's samples do not depend on which others are active.
    """
    mc_sets = [key for key in sets if key[0] == "mc"]
    if not mc_sets:
        return {}
    seed = int(torch.randint(0, 2**62, (1,)).item())
    columns = {}
    for key in mc_sets:
        generator = torch.Generator(device=loss.input.device)
        generator.manual_seed(seed + key[1])
        columns[key] = loss.mc_columns(key[1], generator)
    return columns


def _columns(sets, offsets, start, stop, loss, mc_columns, grad) -> Tensor:
    """Columns ``start:stop`` of the concatenation of all sets."""
    pieces = []
    for set_index, key in enumerate(sets):
        lo, hi = max(start, offsets[set_index]), min(stop, offsets[set_index + 1])
        if lo >= hi:
            continue
        lo, hi = lo - offsets[set_index], hi - offsets[set_index]
        if key[0] == "exact":
            pieces.append(loss.exact_columns(lo, hi))
        elif key[0] == "mc":
            pieces.append(mc_columns[key][lo:hi])
        else:
            pieces.append(grad.unsqueeze(0))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _backpropagate(
    loss_call: LossCall, calls: List[ModuleCall], edges: list, columns: Tensor
) -> Dict[int, object]:
    """Gradients ``[k, N, ...]`` of every recorded output, keyed by ``id(call)``.

    Calls with several outputs get a tuple.
    """
    reached = [edge for edge in edges if edge is not None]
    columns = columns.to(loss_call.input.dtype)
    single = columns.shape[0] == 1  # a plain backward avoids vmap's overhead
    results = torch.autograd.grad(
        [loss_call.edge],
        reached,
        grad_outputs=[columns[0] if single else columns],
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=not single,
    )
    if single:
        results = [None if r is None else r.unsqueeze(0) for r in results]
    results = iter(results)
    num_cols = columns.shape[0]
    call_grads: Dict[int, object] = {}
    for call in calls:
        outputs = []
        for edge, shape in zip(call.edges, call.output_shapes):
            result = next(results) if edge is not None else None
            if result is None:
                result = columns.new_zeros(num_cols, *shape)
            outputs.append(result)
        call_grads[id(call)] = outputs[0] if len(outputs) == 1 else tuple(outputs)
    return call_grads
