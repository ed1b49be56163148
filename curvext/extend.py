"""``extend``: install the hooks that let curvext see a forward pass."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvext.context import recording_enabled
from curvext.losses import SUPPORTED_LOSSES
from curvext.recording import ModuleCall, attach, detach_tree, graph_inputs, graph_outputs

_HOOK_FLAG = "_curvext_extended"


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
    for submodule in module.modules():
        # parameter-free modules (activations, pooling) need no recording
        has_params = next(submodule.parameters(), None) is not None
        if (has_params or isinstance(submodule, _BatchNorm)) and not getattr(
            submodule, _HOOK_FLAG, False
        ):
            submodule.register_forward_hook(_record_call, with_kwargs=True)
            setattr(submodule, _HOOK_FLAG, True)
    return module


def _couples_samples(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and (
        module.training or not module.track_running_stats
    )


def _record_call(module: nn.Module, args, kwargs, output):
    if not recording_enabled():
        return
    # modules whose sub-modules own parameters are recorded too: their call
    # covers parameters used without a module call (MultiheadAttention's
    # out_proj, F.linear(x, self.child.weight))
    trainable = any(p.requires_grad for p in module.parameters())
    couples_samples = _couples_samples(module)
    if not (trainable or couples_samples):
        return
    outputs = graph_outputs(output)
    if not outputs:
        return
    call = ModuleCall(
        module, detach_tree(args), detach_tree(kwargs), couples_samples=couples_samples
    )
    attach(call, graph_inputs((args, kwargs)), outputs)


def _extend_loss(loss_module: nn.Module):
    if getattr(loss_module, _HOOK_FLAG, False):
        return
    loss_module.register_forward_hook(_record_loss_call)
    setattr(loss_module, _HOOK_FLAG, True)


def _record_loss_call(loss_module: nn.Module, args, output):
    from curvext.engine import LossCall

    if not recording_enabled() or len(args) != 2:
        return
    loss_input, target = args
    if not isinstance(loss_input, Tensor) or loss_input.grad_fn is None:
        return
    LossCall(loss_module, loss_input, target, output)
