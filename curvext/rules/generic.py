r"""Rule for any module with parameters that has no dedicated rule.

Per-sample vectors :math:`v_{nk} = J_{\theta}(x_n)^\top g_{nk}` by
``torch.func``: one ``vjp`` of the module's functional form per sample
(``vmap`` over samples), applied to all columns (``vmap`` over columns).
Exact for any module that treats samples independently, but it re-runs the
module's forward per sample and materialises ``[K, N, *p.shape]``, so it is
slower than a dedicated rule; curvext says so once per module type.

Modules that ``vmap`` cannot run (``LSTM``/``GRU``, whose fused kernels
allocate their own hidden state; custom ``autograd.Function`` without a
batching rule) fall back to a loop over samples with plain autograd: still
exact, slower again.

The sample axis of every input and output is the first axis of size ``N``
(the second one first for modules with ``batch_first=False``, like
time-major RNNs, whose hidden states ``[layers, N, H]`` also have it second).
A guess by size can be wrong (a causal mask ``[T, T]`` passed as an argument
when ``T == N``), a module may draw random numbers (dropout in train mode)
or a transform may return a wrong shape, so every result is **verified**:
the per-sample vectors of a random combination of the columns must add up
to the vector-Jacobian product of the whole batch, computed by one plain
re-run of the module. When they do not, the rule tries the other readings
of the ambiguous inputs; when none agrees, or when the module draws random
numbers, it replays the recorded forward pass itself (:meth:`GenericRule.
_graph_per_sample`: one backward per sample and column through the graph
that produced the loss, so the very dropout masks of the forward pass are
used) — exact, and about ``N`` times slower. A module called several times
whose re-run does not agree is refused, naming it.

Re-runs never change the user's state: recording is off, the global random
streams are restored, buffers are copies, and plain tensor attributes
(``torch.nn.utils.prune`` stores the masked weight as one) are put back.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvext.recording import floating_outputs
from curvext.rules.base import ModuleRule

_NOTED = set()


class CurvextNote(UserWarning):
    """A one-time note about how curvext handles a module."""


def note_once(key, message: str):
    """Warn with ``message`` (a :class:`CurvextNote`) the first time ``key`` is seen."""
    if key not in _NOTED:
        _NOTED.add(key)
        warnings.warn(message, CurvextNote, stacklevel=3)


#: Elements of masked columns backpropagated at once by the graph replay.
REPLAY_ELEMENTS = 2**24

#: Alternative readings of the inputs' sample axes tried after a failed check.
MAX_AXIS_READINGS = 16


def verification_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative tolerance of the per-sample check: rounding of ``N`` summed
    vectors is of order ``N eps``; a wrong reading errs by order one. On
    CUDA with TF32 allowed, float32 products round like TF32 (``eps = 2⁻¹⁰``)."""
    eps = torch.finfo(dtype).eps
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    if dtype == torch.float32 and device.type == "cuda" and tf32:
        eps = 2.0**-10
    return min(0.05, 1000 * eps)


@dataclass
class _Rerun:
    """One recorded call, prepared for re-runs of its module.

    Attributes:
        reached: Indices of the recorded outputs that reach the loss.
        positions: Their positions among the floating-point outputs of a re-run.
        out_axes: Their sample axes.
        grads: Their columns ``[K, N, ...]`` (samples moved to axis 1).
        leaves: Flattened ``(args, kwargs)`` of the call.
        spec: Tree spec to rebuild ``(args, kwargs)`` from ``leaves``.
        buffers: Copies of the module's buffers for the re-runs (a forward
            that updates them in place, like ``spectral_norm``'s power
            iteration, changes the copies, never the module).
    """

    reached: List[int]
    positions: List[int]
    out_axes: List[int]
    grads: Tuple[Tensor, ...]
    leaves: list
    spec: object
    buffers: Dict[str, Tensor]


class GenericRule(ModuleRule):
    """Exact per-sample vectors for any module, through ``torch.func``,
    verified against the batch; the recorded graph where a re-run cannot
    reproduce the forward pass."""

    def check(self):
        from curvext.rules import RULES  # the registry (rules/__init__ imports this module)

        name = type(self.module).__name__
        if type(self.module) in RULES:  # a dedicated rule that cannot apply to this call
            message = (
                f"curvext's rule for {name} ({RULES[type(self.module)].__name__}) does not "
                "apply here: the module ran with a forward pre-hook, a parametrization or "
                "other parameters than its rule knows (pruning, weight_norm, ...); its "
                "parameters use the generic torch.func rule (exact, but slower)."
            )
        else:
            message = (
                f"curvext has no dedicated rule for {name}; its parameters use the generic "
                "torch.func rule (exact, but it re-runs the module per sample and is "
                "slower). curvext.rules.register_rule gives it one."
            )
        note_once(type(self.module), message)

    def batch_axis(self, shape) -> Optional[int]:
        """The first axis of size ``N`` (second first if ``batch_first=False``)."""
        axes = [axis for axis, size in enumerate(shape) if size == self.batch_size]
        if getattr(self.module, "batch_first", True) is False and 1 in axes:
            return 1
        return axes[0] if axes else None

    def input_axes(self, call, leaves) -> List[Optional[int]]:
        """Sample axis of each flattened input (``None``: shared by all samples)."""
        return [
            self.batch_axis(leaf.shape) if isinstance(leaf, Tensor) else None for leaf in leaves
        ]

    def axis_readings(self, call, leaves) -> Iterator[List[Optional[int]]]:
        """Readings of the inputs' sample axes, the most likely first.

        After :meth:`input_axes`: every input whose shape has an axis of size
        ``N`` may hold the samples on any of them, or on none (a mask or a
        table shared by all samples whose length happens to be ``N``).
        """
        first = self.input_axes(call, leaves)
        yield first
        options = []
        for leaf, axis in zip(leaves, first):
            if not isinstance(leaf, Tensor):
                options.append([None])
                continue
            sized = [a for a, size in enumerate(leaf.shape) if size == self.batch_size]
            options.append(list(dict.fromkeys([axis, *sized, None])))
        for count, reading in enumerate(itertools.product(*options)):
            if count > MAX_AXIS_READINGS:
                return
            if list(reading) != first:
                yield list(reading)

    def _prepare(self, call, grads) -> _Rerun:
        # outputs that do not reach the loss have zero columns: leave them out
        reached = [i for i, edge in enumerate(call.edges) if edge is not None]
        all_out_axes = self.output_axes(call)
        out_axes = [all_out_axes[i] for i in reached]
        grads = grads if isinstance(grads, tuple) else (grads,)
        grads = tuple(grads[i].movedim(a + 1, 1) for i, a in zip(reached, out_axes))
        positions = [call.output_positions[i] for i in reached]
        leaves, spec = tree_flatten((call.args, call.kwargs))
        buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        return _Rerun(reached, positions, out_axes, grads, leaves, spec, buffers)

    def _outputs(self, params, leaves, rerun: _Rerun) -> Tuple[Tensor, ...]:
        """The reached outputs of one re-run of the module (any batch)."""
        args, kwargs = tree_unflatten(leaves, rerun.spec)
        state = (params, rerun.buffers)
        outputs = floating_outputs(functional_call(self.module, state, args, kwargs))
        return tuple(outputs[i] for i in rerun.positions)

    def _call_per_sample(self, call, names: List[str], grads) -> List[Tensor]:
        """Per-sample vectors ``[K, N, *p.shape]`` of one call, per name.

        ``grads`` holds one ``[K, *output.shape]`` tensor per recorded output.
        """
        rerun = self._prepare(call, grads)
        params = {name: self.param(name).detach() for name in names}
        weights = _column_weights(rerun.grads[0])
        batch_vectors, draws_random = None, False
        with rerun_guard(self.module):
            if call.reproducible:
                batch_vectors, draws_random = self._batch_vjp(params, rerun, weights)
            if not draws_random and batch_vectors is not None:
                for in_axes in self.axis_readings(call, rerun.leaves):
                    per_sample = self._rerun_per_sample(params, rerun, in_axes)
                    if per_sample is not None and _agrees(per_sample, batch_vectors, weights):
                        return [per_sample[name] for name in names]
        per_sample = self._graph_per_sample(call, rerun, names)
        if per_sample is None:
            if draws_random:
                reason = "draws random numbers in its forward pass (dropout in train mode?)"
            elif not call.reproducible:
                reason = (
                    "ran with hooks that a re-run cannot repeat (a forward hook "
                    "registered with prepend=True, or a forward pre-hook such as "
                    "torch.nn.utils.prune's added after extend: from the next forward "
                    "pass on curvext keeps the inputs it needs)"
                )
            else:
                reason = "does not give the same result when re-run per sample"
            raise RuntimeError(
                f"curvext cannot compute per-sample curvature for {self.module}: it "
                f"{reason}, and it is called {len(self.calls)} times in this forward "
                "pass, so the recorded graph cannot be replayed per call either. "
                "Call model.eval() (or set its dropout to 0) for the curvature pass, "
                "and pass tensors shared by all samples (masks, tables) as buffers "
                "or attributes of the module rather than as arguments."
            )
        return [per_sample[name] for name in names]

    def _batch_vjp(self, params, rerun: _Rerun, weights: Tensor):
        """``J^T (Σ_k w_k g_k)`` of the whole batch from one plain re-run (plain
        autograd: it works for any ``autograd.Function``), and whether that
        re-run drew random numbers. ``None`` for a re-run whose outputs
        differ in shape from the recorded ones."""
        combined = [
            torch.einsum("k,kn...->n...", weights.to(g.dtype), g).movedim(0, a)
            for g, a in zip(rerun.grads, rerun.out_axes)
        ]
        trainable = {name: p.detach().requires_grad_() for name, p in params.items()}
        before = random_states(self.module)
        with torch.enable_grad():
            outputs = self._outputs(trainable, rerun.leaves, rerun)
        draws_random = any(
            not torch.equal(a, b) for a, b in zip(before, random_states(self.module))
        )
        if [o.shape for o in outputs] != [c.shape for c in combined]:
            return None, draws_random
        vectors = torch.autograd.grad(
            outputs, list(trainable.values()), combined, allow_unused=True
        )
        return {
            name: torch.zeros_like(p) if v is None else v
            for (name, p), v in zip(trainable.items(), vectors)
        }, draws_random

    def _rerun_per_sample(self, params, rerun: _Rerun, in_axes) -> Optional[Dict[str, Tensor]]:
        """Per-sample vectors by re-running the module per sample with the
        given input axes, or ``None`` if that fails or returns wrong shapes."""
        out_axes = rerun.out_axes

        def forward(sample_params, sample_leaves):
            full = [
                leaf if axis is None else leaf.unsqueeze(axis)
                for leaf, axis in zip(sample_leaves, in_axes)
            ]
            outputs = self._outputs(sample_params, full, rerun)
            return tuple(o.squeeze(a) for o, a in zip(outputs, out_axes))

        def sample_vjp(sample_leaves, sample_grads):
            _, pullback = vjp(lambda p: forward(p, sample_leaves), params)
            return vmap(lambda cols: pullback(cols)[0])(sample_grads)

        try:
            # the math kernel of scaled_dot_product_attention has batching
            # rules; an op without one makes vmap loop with a warning, and the
            # loop below is no slower
            with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
                warnings.filterwarnings("error", message="There is a performance drop")
                per_sample = vmap(sample_vjp, in_dims=(in_axes, 1), out_dims=1)(
                    rerun.leaves, rerun.grads
                )
        except (RuntimeError, UserWarning) as error:
            note_once(
                ("loop", type(self.module)),
                f"torch.func.vmap cannot run {type(self.module).__name__} ({error}); "
                "curvext loops over samples and columns for it instead (exact, slow).",
            )
            per_sample = None
        if per_sample is None or not self._shapes_match(per_sample, rerun):
            try:
                per_sample = self._loop_per_sample(forward, params, rerun, in_axes)
            except RuntimeError:
                return None
        return per_sample if self._shapes_match(per_sample, rerun) else None

    def _shapes_match(self, per_sample: Dict[str, Tensor], rerun: _Rerun) -> bool:
        leading = (rerun.grads[0].shape[0], self.batch_size)
        return all(
            tuple(vectors.shape) == (*leading, *self.param(name).shape)
            for name, vectors in per_sample.items()
        )

    def _loop_per_sample(self, forward, params, rerun: _Rerun, in_axes):
        """Fallback of :meth:`_rerun_per_sample` with plain autograd."""
        grads = rerun.grads
        num_cols = grads[0].shape[0]
        result = {
            name: p.new_zeros(num_cols, self.batch_size, *p.shape) for name, p in params.items()
        }
        trainable = {name: p.detach().requires_grad_() for name, p in params.items()}
        for n in range(self.batch_size):
            sample_leaves = [
                leaf if axis is None else leaf.select(axis, n)
                for leaf, axis in zip(rerun.leaves, in_axes)
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

    def _graph_per_sample(self, call, rerun: _Rerun, names) -> Optional[Dict[str, Tensor]]:
        r"""Per-sample vectors from the recorded graph itself, no re-run.

        :math:`v_{nk}` is the vector-Jacobian product of the call's outputs
        with column ``k`` kept at sample ``n`` and zero elsewhere: one
        backward per pair, batched, through exactly the operations (and
        random draws) of the forward pass. Exact when the module is called
        once (its parameters are then used only inside this call, so no
        path runs through its inputs); ``None`` otherwise.
        """
        if len(self.calls) != 1:
            return None
        note_once(
            ("replay", type(self.module)),
            f"curvext cannot re-run {type(self.module).__name__} per sample (random "
            "numbers, hooks or a forward that differs between calls); it replays the "
            "recorded graph once per sample and column instead (exact, about N times "
            "slower).",
        )
        edges = [call.edges[i] for i in rerun.reached]
        params = [self.param(name) for name in names]
        num_cols, num_samples = rerun.grads[0].shape[:2]
        pairs = num_cols * num_samples
        per_pair = sum(g[0].numel() for g in rerun.grads)
        step = max(1, min(pairs, REPLAY_ELEMENTS // max(per_pair, 1)))
        result = [p.new_zeros(pairs, *p.shape) for p in params]
        for start in range(0, pairs, step):
            index = torch.arange(start, min(start + step, pairs), device=params[0].device)
            cols, samples = index // num_samples, index % num_samples
            masked = []
            for g, axis in zip(rerun.grads, rerun.out_axes):
                kept = g.new_zeros(len(index), *g.shape[1:])
                kept[torch.arange(len(index), device=g.device), samples] = g[cols, samples]
                masked.append(kept.movedim(1, axis + 1))
            with warnings.catch_warnings():
                # the slow path on purpose: legacy vmap may loop over the pairs
                warnings.filterwarnings("ignore", message="There is a performance drop")
                vectors = torch.autograd.grad(
                    edges,
                    params,
                    masked,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            for out, vector in zip(result, vectors):
                if vector is not None:
                    out[start : start + len(index)] = vector
        return {
            name: out.reshape(num_cols, num_samples, *out.shape[1:])
            for name, out in zip(names, result)
        }

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


def _column_weights(grads: Tensor) -> Tensor:
    """Fixed pseudo-random weights ``[K]`` of the columns for the check (a
    private generator: the user's random stream is not touched)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(grads.shape[0], generator=generator, dtype=torch.float64) + 0.5
    return weights.to(device=grads.device)


def _agrees(per_sample: Dict[str, Tensor], batch_vectors: Dict[str, Tensor], weights) -> bool:
    """Whether the weighted per-sample vectors add up to the batch's."""
    for name, vectors in per_sample.items():
        combined = torch.einsum("k,kn...->n...", weights.to(vectors.dtype), vectors)
        combined = combined.reshape(combined.shape[0], -1)
        total = batch_vectors[name].reshape(-1).to(combined.dtype)
        error = torch.linalg.vector_norm(combined.sum(0) - total)
        scale = torch.linalg.vector_norm(combined, dim=1).sum() + torch.linalg.vector_norm(total)
        if not bool(error <= verification_tolerance(vectors.dtype, vectors.device) * scale):
            return False
    return True


def _cuda_devices(module: torch.nn.Module) -> List[torch.device]:
    """The CUDA devices of a module's parameters and buffers."""
    devices = {t.device for t in itertools.chain(module.parameters(), module.buffers())}
    return [d for d in devices if d.type == "cuda"]


def random_states(module: torch.nn.Module) -> List[Tensor]:
    """States of the global random generators a module on its devices may use."""
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in _cuda_devices(module)]


#: Attributes every ``nn.Module`` has (its parameters, buffers, hooks, ...):
#: ``functional_call`` and :func:`rerun_guard` manage those themselves.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


@contextmanager
def rerun_guard(module: torch.nn.Module):
    """Re-run ``module`` without side effects on the user's state.

    Recording is off; the module's own forward hooks (they run after
    curvext's recording hook, so the recorded output is from before them)
    are left out; the global random streams and the attributes of the module
    tree (a pruned weight, a call counter, a dict a forward writes to:
    shallow copies of dicts and lists) are restored afterwards, attributes
    a re-run added are removed. Buffers are passed as copies (:class:`_Rerun`).
    """
    from curvext.context import disable

    saved = []
    for m in module.modules():
        own = {
            name: (value.copy() if type(value) in (dict, list) else value)
            for name, value in vars(m).items()
            if name not in _MODULE_INTERNALS
        }
        saved.append((m, own))
    hooks = (module._forward_hooks, module._forward_hooks_with_kwargs)
    devices = [
        d.index if d.index is not None else torch.cuda.current_device()
        for d in _cuda_devices(module)
    ]
    module._forward_hooks, module._forward_hooks_with_kwargs = OrderedDict(), OrderedDict()
    try:
        with disable(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        module._forward_hooks, module._forward_hooks_with_kwargs = hooks
        for m, own in saved:
            for name in [n for n in vars(m) if n not in _MODULE_INTERNALS and n not in own]:
                del vars(m)[name]
            vars(m).update(own)


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

    def axis_readings(self, call, leaves):
        yield self.input_axes(call, leaves)

    def output_axes(self, call):
        sequence = self._sequence_axis()
        return [sequence] + [1] * (len(call.output_shapes) - 1)
