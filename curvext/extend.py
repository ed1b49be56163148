"""``extend``: install the hooks that let curvext see a forward pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvext.context import recording_enabled
from curvext.losses import SUPPORTED_LOSSES
from curvext.recording import (
    ModuleCall,
    attach,
    call_graph_inputs,
    detach_tree,
    graph_outputs,
    separate_outputs,
)
from curvext.rules import couples_samples, has_trainable, positional_input, records_calls

_HOOK_FLAG = "_curvext_extended"
#: Attribute holding the id of curvext's forward hook on an extended module.
HOOK_ID = "_curvext_hook_id"
#: Attribute holding the id of curvext's forward pre-hook, registered on a
#: module once it has forward pre-hooks of the user's.
PRE_HOOK_ID = "_curvext_pre_hook_id"
#: Attribute where that pre-hook leaves the inputs before any pre-hook ran.
RAW_INPUTS = "_curvext_raw_inputs"
#: Attribute of every extended module: the :class:`ExtendedTree` of the
#: ``extend`` call that first reached it.
EXTENDED_TREE = "_curvext_tree"


class ExtendedTree:
    """What one ``extend(model)`` call shares among the model's modules.

    Attributes:
        holders: ``id → weakref`` of the parameters of the model on which the
            latest backward pass stored results; the next backward pass
            through the model removes them before storing its own.
    """

    def __init__(self):
        self.holders = {}

    # a copied or pickled model starts without results: the holders are the
    # original's parameters (and weak references do not pickle)
    def __deepcopy__(self, memo) -> "ExtendedTree":
        return ExtendedTree()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.holders = {}


def extend(module: nn.Module) -> nn.Module:
    """Install curvext's hooks on ``module`` and all its sub-modules.

    For every sub-module with trainable parameters, each call records its
    inputs so that the engine can turn backpropagated columns into curvature
    of those parameters. A supported loss module (``MSELoss``,
    ``CrossEntropyLoss``, ``BCEWithLogitsLoss``) gets a hook that starts the
    engine when ``loss.backward()`` reaches the loss input inside a
    :class:`curvext.backpack` context.

    Extending twice is harmless. The module is returned, not copied. Call it
    after the model has all its parameters (modules without parameters get no
    hook).

    Args:
        module: A model, a layer or a loss module.

    Returns:
        The same module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"extend() expects a torch.nn.Module, got {type(module).__name__}. "
            "For a loss, use the module form, e.g. extend(nn.CrossEntropyLoss()) "
            "instead of torch.nn.functional.cross_entropy."
        )
    if isinstance(module, SUPPORTED_LOSSES):
        _extend_loss(module)
        return module
    if isinstance(module, nn.modules.loss._Loss):
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise NotImplementedError(
            f"extend() does not support the loss {type(module).__name__}. "
            f"Supported losses: {supported}."
        )
    tree = ExtendedTree()
    for submodule in module.modules():
        vars(submodule).setdefault(EXTENDED_TREE, tree)
        if getattr(submodule, _HOOK_FLAG, False):
            continue
        if records_calls(submodule):
            # first among the forward hooks: the recorded output is the one
            # of the module's own forward, before any hook of the user's
            handle = submodule.register_forward_hook(_record_call, with_kwargs=True, prepend=True)
            setattr(submodule, HOOK_ID, handle.id)
            setattr(submodule, _HOOK_FLAG, True)
            if submodule._forward_pre_hooks:  # pruned already: keep raw inputs from now
                _keep_raw_inputs_from_now(submodule)
    return module


def _record_call(module: nn.Module, args, kwargs, output):
    if torch.compiler.is_compiling() and recording_enabled():
        # dynamo runs this hook eagerly at a graph break; it only gets here
        # when it must trace it (fullgraph=True). Checked first: torch 2.5's
        # dynamo cannot trace the vars() below and would fail with its own message
        raise RuntimeError(
            f"torch.compile is tracing curvext's recording hook on "
            f"{type(module).__name__}, which it cannot compile. Compile the extended "
            "model without fullgraph=True (the hooks then run eagerly between "
            "compiled regions, and curvext is exact), or run the curvature step on "
            "the uncompiled model (compiled._orig_mod shares its parameters)."
        )
    # taken at once: a call that records nothing must not keep them alive
    # (only a module with pre-hooks has them: curvext's pre-hook keeps them)
    raw_inputs = vars(module).pop(RAW_INPUTS, None) if module._forward_pre_hooks else None
    if not recording_enabled():
        return None
    # modules whose sub-modules own parameters are recorded too: their call
    # covers parameters used without a module call (MultiheadAttention's
    # out_proj, F.linear(x, self.child.weight))
    trainable = has_trainable(module)
    coupled = couples_samples(module)
    if not (trainable or coupled):
        return None
    output = separate_outputs(output)
    outputs, positions = graph_outputs(output)
    if not outputs:
        return None
    args, kwargs = positional_input(module, args, kwargs)
    call = ModuleCall(
        module, detach_tree(args), detach_tree(kwargs) if kwargs else {}, couples_samples=coupled
    )
    _how_it_ran(call, raw_inputs)
    for node in attach(call, call_graph_inputs(args, kwargs), outputs, positions):
        # first-order extensions on a backward pass without an extended loss
        # read the gradient that reaches the output here (curvext.engine)
        node.register_prehook(_output_grad_hook())
    return output


def _output_grad_hook():
    global _OUTPUT_GRAD_HOOK
    if _OUTPUT_GRAD_HOOK is None:
        from curvext.engine import output_grad_hook  # the engine imports this module

        _OUTPUT_GRAD_HOOK = output_grad_hook
    return _OUTPUT_GRAD_HOOK


_OUTPUT_GRAD_HOOK = None


def _how_it_ran(call: ModuleCall, raw_inputs) -> None:
    """Set ``call.plain`` and ``call.reproducible`` from the module's hooks.

    Forward pre-hooks may change the inputs or the weights
    (``torch.nn.utils.prune``); forward hooks that run before curvext's may
    change the recorded output. A re-run of the module with its pre-hooks
    reproduces the call if it starts from the inputs before any pre-hook,
    which curvext's own pre-hook keeps: registered by ``extend`` on a module
    that has pre-hooks then, or else at the first call that meets one (that
    call cannot be re-run; the engine replays its graph instead).

    Global module hooks (``register_module_forward_hook``, as used by
    ``FlopCounterMode`` and ``ModuleTracker``) are taken to observe, not to
    change inputs or outputs: otherwise every layer would lose its fast rule
    under a profiler.
    """
    module = call.module
    hooks_before = next(iter(module._forward_hooks), None) != getattr(module, HOOK_ID, None)
    if not (hooks_before or module._forward_pre_hooks):
        return  # the common call: plain and reproducible (the defaults)
    pre_hook_id = getattr(module, PRE_HOOK_ID, None)
    user_pre_hooks = [key for key in module._forward_pre_hooks if key != pre_hook_id]
    call.plain = not (hooks_before or user_pre_hooks)
    call.reproducible = not hooks_before
    if user_pre_hooks:
        if pre_hook_id is None:
            _keep_raw_inputs_from_now(module)
        first = next(iter(module._forward_pre_hooks)) == getattr(module, PRE_HOOK_ID)
        if raw_inputs is None or not first:
            call.reproducible = False
        else:
            call.args, call.kwargs = detach_tree(raw_inputs[0]), detach_tree(raw_inputs[1])


def _keep_raw_inputs_from_now(module: nn.Module) -> None:
    handle = module.register_forward_pre_hook(_keep_raw_inputs, with_kwargs=True, prepend=True)
    setattr(module, PRE_HOOK_ID, handle.id)


def _keep_raw_inputs(module: nn.Module, args, kwargs):
    if recording_enabled():
        vars(module)[RAW_INPUTS] = (args, kwargs)
    return None


def _extend_loss(loss_module: nn.Module):
    if getattr(loss_module, _HOOK_FLAG, False):
        return
    loss_module.register_forward_hook(_record_loss_call, with_kwargs=True)
    setattr(loss_module, _HOOK_FLAG, True)


def _record_loss_call(loss_module: nn.Module, args, kwargs, output):
    from curvext.engine import LossCall

    if not recording_enabled():
        return
    # torch's losses take (input, target), by position or by keyword
    inputs = dict(zip(("input", "target"), args), **kwargs)
    if set(inputs) != {"input", "target"}:
        return
    loss_input, target = inputs["input"], inputs["target"]
    if not isinstance(loss_input, Tensor) or loss_input.grad_fn is None:
        return
    LossCall(loss_module, loss_input, target, output)
