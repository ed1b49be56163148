"""Rule for ``torch.nn.Linear`` on inputs ``[N, ..., in]`` (or ``[..., N, ..., in]``).

The dimensions between the batch and the feature axis (tokens of a sequence,
say) are positions that share the weight.
"""

from __future__ import annotations

from curvext.rules.factored import FactoredRule


class LinearRule(FactoredRule):
    """``y = x Wᵀ + b``: ``G`` is the output column, ``A`` the input.

    The samples may sit on any axis but the last (``[T, N, in]`` after a
    time-major RNN).
    """

    flexible_batch_axis = True

    def check(self):
        for call in self.calls:
            if call.args[0].dim() < 2:
                raise ValueError(
                    f"{self.module} was called on an input of shape "
                    f"{tuple(call.args[0].shape)} without a batch dimension. "
                    "curvext needs inputs shaped [N, ..., in_features]."
                )

    def input_side(self, call):
        inputs = self.batch_first(call, call.args[0])
        inputs = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        return inputs.mT.unsqueeze(1)

    def grad_side(self, call, grads):
        grads = self.batch_first(call, grads, offset=1)
        grads = grads.reshape(*grads.shape[:2], -1, grads.shape[-1])
        return grads.mT.unsqueeze(2)

    bias_side = grad_side
