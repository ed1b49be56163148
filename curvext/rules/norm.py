r"""Rules for normalisation layers with an elementwise affine transform.

``BatchNorm`` (eval mode), ``LayerNorm``, ``GroupNorm`` and ``RMSNorm`` compute
:math:`y = \hat{x} \odot \gamma + \beta` with :math:`\hat x` independent of
:math:`\gamma, \beta`. The per-sample vectors are
:math:`v_\gamma = \sum_{\text{other axes}} g \odot \hat x` and
:math:`v_\beta = \sum g`; they are small (``[K, N, C]``), so every reduction
comes from them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvext.rules.base import ModuleRule


class AffineNormRule(ModuleRule):
    """Shared part; subclasses say how to normalise and where ``γ`` lives."""

    def normalized(self, inputs: Tensor, call) -> Tensor:
        r""":math:`\hat x` of ``call`` (a :class:`~curvext.recording.ModuleCall`),
        shaped like the output."""
        raise NotImplementedError

    def param_axes(self, output_dim: int) -> list:
        """Axes of the output (after ``[K, N]``) that the parameter spans."""
        raise NotImplementedError

    def per_sample(self, name, grads):
        total = 0
        for call, call_grads in zip(self.calls, grads):
            if name == "weight":
                inputs = call.args[0].to(call_grads.dtype)  # autocast: half inputs
                call_grads = call_grads * self.normalized(inputs, call)
            call_grads = self.batch_first(call, call_grads, offset=1)
            keep = self.param_axes(call_grads.dim())
            summed = [d for d in range(2, call_grads.dim()) if d not in keep]
            total = total + (call_grads.sum(summed) if summed else call_grads)
        return total.reshape(*total.shape[:2], *self.param(name).shape)


class BatchNormRule(AffineNormRule):
    r"""``BatchNorm1d/2d/3d`` in eval mode with running statistics.

    Train mode couples the samples and is refused by the engine, except for
    BackPACK's ``BatchGrad`` (``curvext.compat.backpack``), computed from the
    arriving gradient with :math:`\hat x` from the call's batch statistics.
    """

    def normalized(self, inputs, call):
        module = self.module
        if call.couples_samples:  # the statistics of the batch the call normalised
            return F.batch_norm(inputs, None, None, eps=module.eps, training=True)
        return F.batch_norm(
            inputs, module.running_mean, module.running_var, eps=module.eps, training=False
        )

    def param_axes(self, output_dim):
        return [2]


class LayerNormRule(AffineNormRule):
    """``LayerNorm`` over the trailing ``normalized_shape`` axes.

    The samples may sit on any leading axis.
    """

    flexible_batch_axis = True

    def normalized(self, inputs, call):
        return F.layer_norm(inputs, self.module.normalized_shape, eps=self.module.eps)

    def param_axes(self, output_dim):
        num = len(self.module.normalized_shape)
        return list(range(output_dim - num, output_dim))


class RMSNormRule(LayerNormRule):
    """``RMSNorm`` over the trailing ``normalized_shape`` axes."""

    def normalized(self, inputs, call):
        return F.rms_norm(inputs, self.module.normalized_shape, eps=self.module.eps)


class GroupNormRule(AffineNormRule):
    """``GroupNorm`` over groups of channels (axis 1 of the input)."""

    def normalized(self, inputs, call):
        return F.group_norm(inputs, self.module.num_groups, eps=self.module.eps)

    def param_axes(self, output_dim):
        return [2]


RULES = {
    nn.BatchNorm1d: BatchNormRule,
    nn.BatchNorm2d: BatchNormRule,
    nn.BatchNorm3d: BatchNormRule,
    nn.LayerNorm: LayerNormRule,
    nn.GroupNorm: GroupNormRule,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = RMSNormRule
