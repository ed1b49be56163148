r"""Rules for ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d``.

A convolution is a ``Linear`` layer applied to patches. For ``ConvNd`` the
patches of the input (``in/groups · prod(kernel)`` per group and output
position) are ``A`` and the output columns are ``G``. For
``ConvTransposeNd``, whose weight is ``[in, out/groups, *kernel]``, the roles
swap: the input at each position is ``A`` and the patches of the output
column, taken with the forward-convolution geometry of the layer, are ``G``.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvext.rules.factored import FactoredRule

_CONV_TRANSPOSE_FUNCTIONS = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}


def unfold(
    inputs: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Union[str, int, Sequence[int]],
    dilation: Sequence[int],
) -> Tensor:
    """Patches of ``inputs [B, C, *spatial]`` as ``[B, C · prod(kernel), L]``.

    The patch axis is ordered ``(channel, *kernel)`` like a flattened weight.

    The patches are a strided view of the (zero-padded) input, copied once
    into this layout: on CPU 6 to 30 times faster than ``F.unfold``'s
    ``im2col`` (measured on 2 cores, batch 128: 1.0 ms instead of 9.1 ms on
    ``[3, 32, 32]`` inputs, 1.5 ms instead of 10.2 ms on ``[16, 16, 16]``),
    and the same in every dimension.
    """
    batch, channels = inputs.shape[:2]
    spatial = inputs.dim() - 2
    pads = _pads(padding, kernel_size, dilation)
    padded = F.pad(inputs, pads) if any(pads) else inputs
    for axis in range(spatial):
        span = dilation[axis] * (kernel_size[axis] - 1) + 1
        # appends the window as a trailing axis: [B, C, *out, *kernel] at the end
        padded = padded.unfold(2 + axis, span, stride[axis])
        if dilation[axis] > 1:
            padded = padded[..., :: dilation[axis]]
    kernel_first = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    positions = math.prod(padded.shape[2 : 2 + spatial])  # explicit: B or C may be 0
    return padded.permute(kernel_first).reshape(batch, channels * math.prod(kernel_size), positions)


def _pads(
    padding: Union[str, int, Sequence[int]], kernel_size: Sequence[int], dilation: Sequence[int]
) -> list:
    """``F.pad``'s argument (last axis first) for a convolution's ``padding``;
    ``"same"`` pads ``dilation · (k - 1)`` per axis, the extra one at the end,
    as PyTorch does."""
    if padding == "valid":
        padding = 0
    if isinstance(padding, int):
        padding = [padding] * len(kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        pairs = [(total // 2, total - total // 2) for total in totals]
    else:
        pairs = [(p, p) for p in padding]
    return [pad for pair in reversed(pairs) for pad in pair]


def unfold_transposed(
    inputs: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """The input of a transposed convolution spread over its output,
    ``[B, C · prod(kernel), X]`` for ``inputs [B, C, *spatial]``.

    Entry ``(c, k)`` at output position ``x`` is the input pixel of channel
    ``c`` that kernel element ``k`` carries to ``x`` (a transposed
    convolution with one-hot kernels per channel; ``X`` the output positions
    without ``output_padding``), so the layer's output is
    ``weight.transpose(0, 1).flatten(1) @`` these columns.
    """
    batch, channels = inputs.shape[:2]
    # one one-hot kernel per channel and kernel element: [in, out / groups, *kernel]
    kernel_numel = math.prod(kernel_size)
    one_hot = torch.eye(kernel_numel, dtype=inputs.dtype, device=inputs.device)
    weight = one_hot.reshape(1, kernel_numel, *kernel_size).repeat(
        channels, *[1] * (len(kernel_size) + 1)
    )
    transposed = _CONV_TRANSPOSE_FUNCTIONS[inputs.dim() - 2]
    patches = transposed(
        inputs, weight, stride=stride, padding=padding, groups=channels, dilation=dilation
    )
    return patches.reshape(batch, channels * kernel_numel, -1)


class ConvRule(FactoredRule):
    """``ConvNd``: ``A`` are the input patches, ``G`` the output columns."""

    def input_side(self, call):
        module: nn.Conv2d = self.module
        inputs = call.args[0]
        padding = module.padding
        if module.padding_mode != "zeros":
            inputs = F.pad(
                inputs, module._reversed_padding_repeated_twice, mode=module.padding_mode
            )
            padding = 0 if isinstance(padding, str) else [0] * len(module.kernel_size)
        patches = unfold(inputs, module.kernel_size, module.stride, padding, module.dilation)
        return patches.reshape(patches.shape[0], module.groups, -1, patches.shape[-1])

    def grad_side(self, call, grads):
        groups = self.module.groups
        return grads.reshape(*grads.shape[:2], groups, -1, grads[0, 0, 0].numel())

    def bias_side(self, call, grads):
        return grads.reshape(*grads.shape[:3], -1).unsqueeze(2)

    def check(self):
        for call in self.calls:
            if call.args[0].dim() != len(self.module.kernel_size) + 2:
                raise ValueError(
                    f"{self.module} was called on an input of shape "
                    f"{tuple(call.args[0].shape)} without a batch dimension. "
                    "curvext needs inputs shaped [N, C, *spatial]."
                )


class ConvTransposeRule(ConvRule):
    """``ConvTransposeNd``: ``A`` is the input, ``G`` the output-column patches."""

    grad_first = False
    entry_grad_side = False

    def input_side(self, call):
        inputs = call.args[0]
        return inputs.reshape(inputs.shape[0], self.module.groups, -1, inputs[0, 0].numel())

    def grad_side(self, call, grads):
        module: nn.ConvTranspose2d = self.module
        num_cols, batch = grads.shape[:2]
        patches = unfold(
            grads.flatten(0, 1),
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
        )
        return patches.reshape(num_cols, batch, module.groups, -1, patches.shape[-1])
