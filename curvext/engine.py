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

A backward pass that reaches no extended loss (``out[:, i].sum().backward()``)
computes the first-order extensions only (``Extension.any_backward``), as
BackPACK does: :func:`output_grad_hook`, a pre-hook on every autograd node
holding a recorded output, collects the gradient arriving there (the one
column "gradient"), and when the pass ends :func:`_run_without_loss` reduces
them with the same rules and stores the results. Second-order extensions
still need the loss (the context says that they computed nothing).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from curvext.context import (
    NO_LOSS_RUN,
    active_extensions,
    current_run_log,
    disable,
    max_columns_per_backward,
    no_loss_extensions,
)
from curvext.context import _state as _context_state
from curvext.curvature_terms import add_averaged, add_residuals
from curvext.extend import EXTENDED_TREE
from curvext.extensions.base import (
    AVERAGED,
    GRADIENT,
    RESIDUAL,
    ColumnSet,
    Combine,
    Extension,
    RunInfo,
    sum_partials,
)
from curvext.losses import LossRule, loss_rule
from curvext.push import CHUNK_BYTES, backpropagate
from curvext.recording import (
    METADATA_KEY,
    ModuleCall,
    collect_calls,
    collect_reached_calls,
    flattened_samples,
)
from curvext.rules.assign import assign
from curvext.rules.base import first_parameter, slice_columns

_engine = threading.local()


class LossCall:
    """One call of an extended loss; its hooks start the engine.

    The engine runs when the backward pass that reaches the loss input is the
    one that went through this loss's output (a regulariser backpropagated
    through the same prediction does not trigger it). The object holds no
    autograd node, so the graph is freed as soon as the user drops it.

    Args:
        module: The loss module.
        loss_input: The prediction passed to the loss (in the graph).
        target: The target.
        loss_output: The loss value returned by the module.
    """

    def __init__(self, module: nn.Module, loss_input: Tensor, target, loss_output: Tensor):
        self.module = module
        self.input = loss_input.detach()
        self.target = target.detach() if isinstance(target, Tensor) else target
        self.output_nr = loss_input.output_nr  # loss_input is in the graph (grad_fn set)
        self.graph_task = None
        loss_input.register_hook(self._on_grad)
        if loss_output.grad_fn is not None:
            loss_output.grad_fn.register_prehook(self._on_loss_backward)

    def _on_loss_backward(self, grad_outputs):
        self.graph_task = torch._C._current_graph_task_id()

    def _on_grad(self, grad: Tensor):
        if getattr(_engine, "running", False):
            return None
        extensions = active_extensions()
        task = torch._C._current_graph_task_id()
        if not extensions or task != self.graph_task:
            return None
        previous = getattr(_engine, "last_run", None)
        if previous is not None and previous[0] == task:
            raise RuntimeError(
                f"Two extended losses ({previous[1]} and "
                f"{type(self.module).__name__}) are backpropagated in one backward "
                "pass; curvext computes the curvature of one loss per backward "
                "pass. Call backward on each loss separately, or compute the loss "
                "with one call of the loss module (e.g. on concatenated outputs)."
            )
        _engine.last_run = (task, type(self.module).__name__)
        # the autograd node of the loss input, found only now: keeping it from
        # the forward pass would tie the graph's lifetime to this object
        edge = GradientEdge(torch._C._current_autograd_node(), self.output_nr)
        _engine.running = True
        try:
            run(self, edge, grad.detach(), extensions)
        except _FromArrivingGradients:
            # as if no extended loss were reached: the output pre-hooks collect
            _engine.last_run = previous
            return None
        finally:
            _engine.running = False
        run_log = current_run_log()
        if run_log is not None:
            run_log.append(type(self.module).__name__)
        return None


class _FromArrivingGradients(Exception):
    """Raised by :func:`run` to hand a pass over to the first-order path
    (:func:`output_grad_hook`), see :func:`_tolerate_coupling`."""


def _tolerate_coupling(calls: List[ModuleCall], extensions: Tuple[Extension, ...]) -> bool:
    """Whether calls that couple the samples (BatchNorm in train mode) are
    computed from the arriving gradients, with BackPACK's warning: every
    extension that reads columns is first-order with ``batch_statistics =
    "warn"`` (BackPACK's first-order extensions in ``curvext.compat.backpack``)."""
    if not any(call.couples_samples for call in calls):
        return False
    readers = [ext for ext in extensions if ext.column_sets()]
    return bool(readers) and all(
        ext.any_backward and ext.batch_statistics == "warn" for ext in readers
    )


def _check_calls(calls: List[ModuleCall], extensions: Tuple[Extension, ...] = ()):
    """Refuse calls that couple the samples, unless :func:`_tolerate_coupling`
    (then warn, as BackPACK does)."""
    if _tolerate_coupling(calls, extensions):
        coupled = next(call for call in calls if call.couples_samples)
        warnings.warn(
            f"{coupled.module} normalises with batch statistics (train mode), which "
            "couples the samples: as in BackPACK, the first-order results are computed "
            "from the gradient arriving at each module output; their rows sum to the "
            "gradient but are not per-sample gradients. Call model.eval() for "
            "per-sample quantities.",
            stacklevel=2,
        )
        return
    for call in calls:
        if call.couples_samples:
            raise RuntimeError(
                f"{call.module} normalises with batch statistics (train mode), which "
                "couples the samples of a batch, so per-sample quantities (curvature, "
                "individual gradients) are not defined. Call model.eval() (BatchNorm "
                "then uses its running statistics) or replace BatchNorm with "
                "GroupNorm/LayerNorm."
            )


def _check_sample_major(calls: List[ModuleCall], rows: int, samples: int) -> None:
    """Refuse a flattened loss behind a time-major module: its rows are then
    grouped by time step, not by sample (PyTorch's word_language_model:
    ``decoder(lstm_output).view(-1, V)`` with ``[T, N, V]``), which a size
    check cannot see when ``T == N``."""
    for call in calls:
        if getattr(call.module, "batch_first", True) is False:
            raise ValueError(
                f"The loss input has {rows} rows, a flatten of a tensor whose axis 0 "
                f"curvext takes as {samples} samples, but {type(call.module).__name__}"
                "(batch_first=False) makes time-major outputs [T, N, ...], so axis 0 "
                "is time. Use batch_first=True, or move the samples to axis 0 before "
                "flattening (logits.transpose(0, 1).reshape(-1, V), with the targets "
                "likewise)."
            )


def _column_sizes(sets: List[ColumnSet], loss: LossRule) -> List[int]:
    return [key.size(loss) for key in sets]


def _chunk_size(
    calls: List[ModuleCall], loss: LossRule, total: int, extensions: Tuple[Extension, ...] = ()
) -> int:
    requested = max_columns_per_backward()
    if requested is not None:
        return requested
    # an extension may cap the columns per backward (``columns_per_backward``):
    # the data-set passes of KFAC/EKFAC take one column at a time
    caps = [ext.columns_per_backward for ext in extensions]
    caps = [cap for cap in caps if cap is not None]
    if caps:
        return max(1, min(total, *caps))
    itemsize = loss.input.element_size()
    bytes_per_column = itemsize * (
        loss.input.numel() + sum(s.numel() for c in calls for s in c.output_shapes)
    )
    return max(1, min(total, CHUNK_BYTES // max(bytes_per_column, 1)))


def run(loss_call: LossCall, edge: GradientEdge, grad: Tensor, extensions: Tuple[Extension, ...]):
    """Compute ``extensions`` for the loss call whose input gradient is ``grad``.

    Args:
        loss_call: The loss call.
        edge: Gradient edge of the loss input.
        grad: Gradient of the loss input, shaped like it.
        extensions: The active extensions.
    """
    samples = flattened_samples(edge, loss_call.input)
    loss = loss_rule(loss_call.module, loss_call.input, loss_call.target, samples)
    calls, consumers = collect_calls(edge.node)
    if _tolerate_coupling(calls, extensions):
        raise _FromArrivingGradients
    if samples is not None:
        _check_sample_major(calls, loss_call.input.shape[0], samples)
    try:
        _run(edge, loss, calls, consumers, grad, extensions, lambda: _loss_gradient(loss_call))
    finally:
        for call in calls:  # the edges hold graph nodes: release them now
            call.edges = []


def _loss_gradient(loss_call: LossCall) -> Tensor:
    """Gradient of the loss module's own output w.r.t. its input (what
    arrives at the loss input may be scaled: ``GradScaler``, ``3 * loss``)."""
    with torch.enable_grad(), disable():
        loss_input = loss_call.input.detach().requires_grad_()
        value = loss_call.module(loss_input, loss_call.target)
        (gradient,) = torch.autograd.grad(value, loss_input)
    return gradient


def _run(edge, loss, calls, consumers, grad, extensions, loss_gradient):
    loss_name = type(loss.module).__name__
    if not calls:
        raise RuntimeError(
            f"The graph of the {loss_name} input contains no call of an extended "
            "module with trainable parameters. Call `model = extend(model)` "
            "before the forward pass, outside of curvext.disable()."
        )
    _check_calls(calls)
    targets = assign(calls, consumers, loss.batch_size)
    rules = list({id(rule): rule for t in targets for rule, _ in t.owners}.values())
    _probe_sample_axes(edge, rules, loss)
    # only outputs of calls that some rule reads are backpropagated to
    used_calls = list({id(c): c for rule in rules for c in rule.calls}.values())
    info = RunInfo(batch_size=loss.batch_size, normalization=loss.normalization, loss=loss)

    sets = list(OrderedDict.fromkeys(key for ext in extensions for key in ext.column_sets()))
    sizes = _column_sizes(sets, loss)
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    mc_columns = _draw_mc_columns(sets, loss)

    # first-order results of a loss pass come from the gradient of the loss;
    # fingerprints of it at each module output let output_grad_hook check that
    # the backward brings no other gradient there (_check_gradient_column)
    checked = {} if no_loss_extensions() and GRADIENT in sets else None
    _engine.gradient_column = (torch._C._current_graph_task_id(), checked, {id(c) for c in calls})

    partials: Dict[Tuple[int, int], object] = {}
    total = offsets[-1]
    step = _chunk_size(used_calls, loss, total, extensions) if total else 1
    for start in range(0, total, step):
        # (id(sum so far), id(partial)) -> (both, their sum): a partial shared by
        # two parameters (the KFAC factor G of a weight and its bias) is added
        # once and stays shared over chunks; the entries keep the ids alive
        sums: Dict[Tuple[int, int], tuple] = {}
        stop = min(start + step, total)
        pieces = _overlaps(offsets, start, stop)
        columns = _columns(sets, offsets, pieces, loss, mc_columns, grad)
        call_grads = backpropagate(edge, used_calls, columns, loss.input.dtype)
        if checked is not None and GRADIENT in sets:
            column = offsets[sets.index(GRADIENT)] - start
            if 0 <= column < stop - start:
                for call in used_calls:
                    grads = call_grads[id(call)]
                    grads = grads if isinstance(grads, tuple) else (grads,)
                    for index, g in enumerate(grads):
                        checked[(id(call), index)] = _fingerprint(g[column])
        for set_index, lo, hi in pieces:
            set_grads = {
                key: slice_columns(g, lo - start, hi - start) for key, g in call_grads.items()
            }
            for ext_index, ext in enumerate(extensions):
                if sets[set_index] not in ext.column_sets():
                    continue
                for target_index, target in enumerate(targets):
                    partial = ext.reduce(target.rule, target.name, target.grads(set_grads))
                    slot = (ext_index, target_index, sets[set_index])
                    if ext.combine is Combine.CAT:
                        partials.setdefault(slot, []).append(partial)
                    elif slot in partials:
                        key = (id(partials[slot]), id(partial))
                        if key not in sums:
                            sums[key] = (
                                partials[slot],
                                partial,
                                sum_partials(partials[slot], partial),
                            )
                        partials[slot] = sums[key][2]
                    else:
                        partials[slot] = partial
        # free this chunk's columns before the next one is backpropagated
        del call_grads, set_grads, columns, sums
        for rule in rules:
            rule.release()

    if RESIDUAL in sets:
        add_residuals(edge, loss_gradient(), loss, used_calls, extensions, targets, partials)
        for rule in rules:
            rule.release()
    if AVERAGED in sets:
        add_averaged(edge, loss, loss_gradient, extensions, targets, partials)
    _store_results(extensions, targets, calls, partials, info)


def _probe_sample_axes(edge: GradientEdge, rules, loss: LossRule) -> None:
    """Find the sample axis of outputs where sizes cannot tell it.

    A layer acting on the last axis takes the first axis of size ``N`` as the
    samples; ``[T, N, D]`` with ``T == N`` (a time-major layer whose output is
    transposed back for the loss) would be read batch-first, silently wrong.
    For such outputs one backward pass of a probe (random values on the loss
    input's first sample, zeros elsewhere) shows the axis: samples do not
    mix (layers that mix them are refused), so the probe's gradient at the
    output vanishes off index 0 of the sample axis only. Where the probe
    cannot tell (both or neither axis look so), the first axis stays.
    """
    ambiguous = []  # (rule, call, candidate axes)
    for rule in rules:
        for call in rule.calls:
            axes = rule.ambiguous_axes(call)
            if axes and call.edges and call.edges[0] is not None:
                ambiguous.append((rule, call, axes))
    if not ambiguous:
        return
    rows = loss.input.shape[0] // loss.batch_size  # rows of one sample (flattened losses)
    generator = torch.Generator(device=loss.input.device).manual_seed(0)
    probe = torch.zeros_like(loss.input)
    probe[:rows] = torch.randn(
        probe[:rows].shape, generator=generator, dtype=probe.dtype, device=probe.device
    )
    edges = [call.edges[0] for _, call, _ in ambiguous]
    grads = torch.autograd.grad(
        [edge], edges, grad_outputs=[probe], retain_graph=True, allow_unused=True
    )
    for (rule, call, axes), grad in zip(ambiguous, grads):
        if grad is None:
            continue
        magnitude = grad.detach().abs()
        separating = [axis for axis in axes if _only_first_index(magnitude, axis)]
        if len(separating) == 1:
            rule.set_sample_axis(call, separating[0])


def _only_first_index(magnitude: Tensor, axis: int) -> bool:
    """Whether ``magnitude`` is nonzero at index 0 of ``axis`` and zero elsewhere."""
    per_index = magnitude.movedim(axis, 0).flatten(1).sum(1)
    return bool(per_index[0] > 0) and not bool(per_index[1:].any())


def _store_results(extensions, targets, calls, partials, info: RunInfo) -> None:
    """Finalise the combined ``partials`` of every extension and target and
    store them, after removing the results of earlier backward passes."""
    stored_before = _forget_stored(calls, targets)
    for ext_index, ext in enumerate(extensions):
        results = []
        keys = ext.column_sets()
        for target_index, target in enumerate(targets):
            parts = []
            for key in keys:
                partial = partials.pop((ext_index, target_index, key), None)
                if ext.combine is Combine.CAT and partial is not None:
                    partial = _concatenate(partial)
                parts.append(partial)
            # an extension reading several column sets gets one partial per set
            partial = tuple(parts) if len(keys) > 1 else (parts[0] if parts else None)
            value = ext.finalize(target.rule, target.name, partial, info)
            results.append((target.param, value))
        # stores p.<savefield>; extensions coupling parameters combine here
        ext.finalize_all(results, info)
    info.loss = None  # finalisation is over (see RunInfo)
    for target, before in zip(targets, stored_before):
        vars(target.param)[STORED] = set(vars(target.param)) - before
        tree = getattr(target.rule.module, EXTENDED_TREE, None)
        if tree is not None:
            tree.holders[id(target.param)] = weakref.ref(target.param)


def _concatenate(parts: list):
    """The partials of column chunks joined along the column axis (tuples
    of partials component by component)."""
    if isinstance(parts[0], tuple):
        return tuple(_concatenate(list(component)) for component in zip(*parts))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


#: Attribute of a parameter naming the results curvext stored on it last.
STORED = "_curvext_stored"


def take_stored(param: Tensor) -> Dict[str, object]:
    """Remove the results of curvext's latest backward pass from ``param`` and
    return them (with their bookkeeping), for :func:`put_stored`: a pass over
    a data set inside curvext leaves the user's results as they were."""
    names = vars(param).get(STORED, set())
    return {name: vars(param).pop(name) for name in [*names, STORED] if name in vars(param)}


def put_stored(param: Tensor, saved: Dict[str, object]) -> None:
    """Undo :func:`take_stored` after dropping what curvext stored since."""
    _drop_stored(param)
    vars(param).update(saved)


def _drop_stored(param: Tensor) -> None:
    """Delete the results curvext stored on ``param`` in its latest backward."""
    for name in vars(param).pop(STORED, ()):
        vars(param).pop(name, None)


def _forget_stored(calls: List[ModuleCall], targets) -> List[set]:
    """Delete the results of earlier backward passes from every parameter of
    the models (the trees ``extend`` was called on) that this pass goes
    through: a parameter it does not reach must not keep numbers of another
    batch. Returns each target's attribute names left."""
    trees = {}
    for call in calls:
        tree = getattr(call.module, EXTENDED_TREE, None)
        if tree is not None:
            trees[id(tree)] = tree
    for tree in trees.values():
        for reference in tree.holders.values():
            param = reference()
            if param is not None:
                _drop_stored(param)
        tree.holders.clear()
    for target in targets:  # extended in another tree, or stored by hand
        _drop_stored(target.param)
    return [set(vars(t.param)) for t in targets]


def _overlaps(offsets: List[int], start: int, stop: int) -> List[Tuple[int, int, int]]:
    """``(set index, lo, hi)``: the part ``lo:hi`` of each column set that lies
    in the chunk ``start:stop`` of the concatenated columns."""
    pieces = []
    for set_index in range(len(offsets) - 1):
        lo, hi = max(start, offsets[set_index]), min(stop, offsets[set_index + 1])
        if lo < hi:
            pieces.append((set_index, lo, hi))
    return pieces


def _draw_mc_columns(sets: List[ColumnSet], loss: LossRule) -> Dict[ColumnSet, Tensor]:
    """MC columns of every ``("mc", M)`` set.

    One seed is drawn from the global CPU generator per backward pass, so
    MC results are reproducible under ``torch.manual_seed`` and the user's
    random stream advances by the same amount whatever the number of
    samples or the batch size. Each set gets its own generator seeded from
    it, so an extension's samples do not depend on which others are active.
    """
    mc_sets = [key for key in sets if key.kind == "mc"]
    if not mc_sets:
        return {}
    seed = int(torch.randint(0, 2**62, (1,)).item())
    columns = {}
    for key in mc_sets:
        generator = _generator(loss.input.device)
        generator.manual_seed(seed + key.samples)
        columns[key] = loss.mc_columns(key.samples, generator)
    return columns


def _generator(device: torch.device) -> torch.Generator:
    """This thread's generator for MC columns on ``device`` (reseeded at
    every use, so one per device and thread suffices)."""
    generators = _engine.__dict__.setdefault("generators", {})
    if device not in generators:
        generators[device] = torch.Generator(device=device)
    return generators[device]


def _columns(sets, offsets, pieces, loss, mc_columns, grad) -> Tensor:
    """The columns of one chunk, ``[stop - start, *loss_input.shape]``.

    ``pieces`` holds ``(set index, lo, hi)`` in the concatenated numbering,
    where set ``i`` starts at ``offsets[i]``.
    """
    columns = []
    for set_index, lo, hi in pieces:
        key = sets[set_index]
        lo, hi = lo - offsets[set_index], hi - offsets[set_index]
        if key.kind == "exact":
            columns.append(loss.exact_columns(lo, hi))
        elif key.kind == "mc":
            columns.append(mc_columns[key][lo:hi])
        else:
            columns.append(grad.unsqueeze(0))
    return torch.cat(columns) if len(columns) > 1 else columns[0]


# ---------------------------------------------------------------------------
# First-order extensions on a backward pass without an extended loss
# ---------------------------------------------------------------------------
class FirstOrderPass:
    """The gradients that one backward pass (graph task) without an extended
    loss brought to recorded module outputs, collected by
    :func:`output_grad_hook` until the pass ends.

    Attributes:
        extensions: The active extensions computed without a loss.
        nodes: The recorded output nodes the pass executed, in order.
        grads: ``(id(call), output index) → gradient`` (``None``: none arrived).
        batch_size: ``N``, axis 0 of the first output reached (the one
            nearest the backpropagated scalar).
    """

    def __init__(self, extensions: Tuple[Extension, ...]):
        self.extensions = extensions
        self.nodes = []
        self.grads: Dict[Tuple[int, int], object] = {}
        self.batch_size = None

    def add(self, node, grad_outputs) -> None:
        self.nodes.append(node)
        for slot in node.metadata.get(METADATA_KEY, ()):
            grad = grad_outputs[slot.output_nr]
            self.grads[(id(slot.call), slot.index)] = None if grad is None else grad.detach()
            shape = slot.call.output_shapes[slot.index]
            if self.batch_size is None and len(shape) > 0:
                self.batch_size = shape[0]


def output_grad_hook(grad_outputs):
    """Pre-hook of every autograd node holding a recorded module output.

    Inside a ``backpack`` context with first-order extensions, a backward
    pass that reaches no extended loss collects the gradient arriving at each
    recorded output; when the pass ends (a callback queued on the autograd
    engine), :func:`_finish_pass` turns them into the extensions' results.
    Outside such a context, and in a pass that reaches an extended loss
    (``LossCall`` ran in it), it returns at once.
    """
    passes = getattr(_context_state, "pending", None)
    if passes is None or getattr(_engine, "running", False):
        return None
    task = torch._C._current_graph_task_id()
    last = getattr(_engine, "last_run", None)
    if last is not None and last[0] == task:
        _check_gradient_column(task, grad_outputs)  # the loss path computed this pass
        return None
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise RuntimeError(
            "backward(create_graph=True) inside backpack(...) with first-order "
            "extensions and no extended loss: curvext's per-sample results are not "
            "differentiable (BackPACK's are), so derivatives through them would "
            "silently miss terms. Call backward without create_graph for the "
            "extensions, and differentiate in a separate pass."
        )
    collected = passes.get(task)
    if collected is None:
        collected = passes[task] = FirstOrderPass(no_loss_extensions())
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _finish_pass(passes, task))
    collected.add(torch._C._current_autograd_node(), grad_outputs)
    return None


#: Entries of a gradient that :func:`_fingerprint` weighs one by one.
FINGERPRINT_ENTRIES = 4096


def _fingerprint(grad: Tensor) -> Tuple[float, float]:
    """The sum of ``grad``'s entries (in float32 or wider) plus a weighted
    sum (in float64) of at most :data:`FINGERPRINT_ENTRIES` of them (evenly strided; weights spread
    over [1, 2] so that a change rarely cancels), and its scale, without a
    copy of ``grad`` (a full float64 copy and weight vector cost the CNN
    benchmark 30 MB and 10 ms per backward)."""
    flat = grad.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // FINGERPRINT_ENTRIES)].double()
    weights = torch.linspace(1.0, 2.0, sample.numel(), dtype=sample.dtype, device=flat.device)
    # in float32 at least (bfloat16 sums are too coarse for the check), but
    # not in float64 for float32 gradients: that reduction would copy them
    accumulate = torch.promote_types(flat.dtype, torch.float32)
    total = flat.sum(dtype=accumulate).double()
    magnitude = torch.linalg.vector_norm(flat, 1, dtype=accumulate).double()
    return float(sample @ weights + total), float(sample.abs() @ weights + magnitude)


def _check_gradient_column(task: int, grad_outputs) -> None:
    """In a pass whose first-order results came from the extended loss, refuse
    gradient that reaches a module output from elsewhere (a term added to the
    loss outside the loss module, on a module's output): the results would
    miss it while ``p.grad`` has it."""
    recorded = getattr(_engine, "gradient_column", None)
    if recorded is None or recorded[0] != task or recorded[1] is None:
        return
    _, checked, loss_calls = recorded
    node = torch._C._current_autograd_node()
    for slot in node.metadata.get(METADATA_KEY, ()):
        grad = grad_outputs[slot.output_nr]
        if grad is None:
            continue
        expected = checked.get((id(slot.call), slot.index))
        if expected is None and id(slot.call) in loss_calls:
            continue  # a call no rule reads (a container around a ruled module)
        value, scale = _fingerprint(grad)
        tolerance = 1e-4 * max(scale, expected[1] if expected else 0.0) + 1e-30
        if expected is None or abs(value - expected[0]) > tolerance:
            name = type(slot.call.module).__name__
            raise RuntimeError(
                f"The backward pass brings gradient to the output of {name} that does "
                "not come from the extended loss (a term added to the loss outside the "
                "loss module, e.g. a penalty on an intermediate output), so the "
                "first-order extensions, computed from the loss, would miss it. "
                "Include the term in the loss module's input, or compute the "
                "first-order quantities in a backward pass of the whole objective "
                "without an extended loss (loss_fn unextended)."
            )


def _finish_pass(passes: dict, task: int) -> None:
    collected = passes.pop(task, None)
    last = getattr(_engine, "last_run", None)
    if collected is None or (last is not None and last[0] == task):
        return  # an extended loss was reached after all: its results stand
    _engine.running = True
    try:
        _run_without_loss(collected)
    finally:
        _engine.running = False
    run_log = current_run_log()
    if run_log is not None:
        run_log.append(NO_LOSS_RUN)


def _run_without_loss(collected: FirstOrderPass) -> None:
    """Reduce the collected output gradients (one column: the gradient) with
    each module's rule and store the first-order results."""
    calls, consumers = collect_reached_calls(collected.nodes)
    collected.nodes = []
    try:
        _check_calls(calls, collected.extensions)
        if collected.batch_size is None:
            raise RuntimeError(
                "The backward pass reached only 0-dimensional outputs of extended "
                "modules; curvext takes the samples from axis 0 of the modules' "
                "outputs and cannot compute per-sample quantities here."
            )
        extensions = collected.extensions
        targets = assign(calls, consumers, collected.batch_size)
        call_grads = {id(call): _call_grads(call, collected) for call in calls}
        partials = {}
        for ext_index, ext in enumerate(extensions):
            if GRADIENT not in ext.column_sets():
                continue
            for target_index, target in enumerate(targets):
                partial = ext.reduce(target.rule, target.name, target.grads(call_grads))
                partials[(ext_index, target_index, GRADIENT)] = partial
        del call_grads
        for rule in {id(t.rule): t.rule for t in targets}.values():
            rule.release()
        info = RunInfo(batch_size=collected.batch_size, normalization=1.0)
        _store_results(extensions, targets, calls, partials, info)
    except RuntimeError as error:
        if "backward through the graph a second time" not in str(error):
            raise
        raise RuntimeError(
            "curvext needed the autograd graph of a module it cannot re-run per "
            "sample (it replays the recorded graph) after a backward pass without an "
            "extended loss had freed it. Call backward(retain_graph=True) inside the "
            "context, or compute the loss with an extended loss module."
        ) from error
    finally:
        collected.grads = {}
        for call in calls:  # the edges hold graph nodes: release them now
            call.edges = []


def _call_grads(call: ModuleCall, collected: FirstOrderPass):
    """The one-column gradients ``[1, N, ...]`` of ``call``'s outputs (zeros
    for an output no gradient reached), in its parameters' dtype."""
    param = first_parameter(call.module)
    arrived = [collected.grads.get((id(call), i)) for i in range(len(call.output_shapes))]
    some = next((g for g in arrived if g is not None), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    dtype = dtype or (some.dtype if some is not None else torch.get_default_dtype())
    device = some.device if some is not None else (param.device if param is not None else None)
    outputs = [
        torch.zeros(1, *shape, dtype=dtype, device=device)
        if grad is None
        else grad.unsqueeze(0).to(dtype)
        for grad, shape in zip(arrived, call.output_shapes)
    ]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
