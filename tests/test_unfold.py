"""``curvext.rules.conv.unfold`` (the patches ``A`` of every convolution rule)
against PyTorch's own convolutions: a layer is its flattened weight times the
patches of its input, for every dimension, stride, padding (numbers and the
strings ``"same"``/``"valid"``), dilation and kernel shape; in 2-D the patches
also equal ``F.unfold``'s entry for entry."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from curvext.rules.conv import unfold

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CASES = [
    (dim, kernel, stride, padding, dilation)
    for dim, kernel, stride, padding, dilation in itertools.product(
        (1, 2, 3), (1, 2, 3), (1, 2), (0, 2, "same", "valid"), (1, 2)
    )
    if not (padding == "same" and stride > 1)  # PyTorch refuses it
]


@pytest.mark.parametrize("dim, kernel, stride, padding, dilation", CASES)
def test_patches_times_weight_is_the_convolution(dim, kernel, stride, padding, dilation):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *[7, 6, 5][:dim], dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 3, *[kernel] * dim, dtype=torch.float64, generator=generator)
    pad = padding if isinstance(padding, str) else [padding] * dim
    expected = CONV[dim](x, weight, None, [stride] * dim, pad, [dilation] * dim)
    patches = unfold(x, [kernel] * dim, [stride] * dim, pad, [dilation] * dim)
    assert patches.shape == (2, 3 * kernel**dim, expected[0, 0].numel())
    torch.testing.assert_close((weight.flatten(1) @ patches).reshape(expected.shape), expected)
    if dim == 2 and not isinstance(padding, str):
        unfolded = F.unfold(x, [kernel] * dim, [dilation] * dim, pad, [stride] * dim)
        assert torch.equal(patches, unfolded)


def test_uneven_kernel_stride_padding_and_dilation_per_axis():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(5, 3, 3, 2, dtype=torch.float64, generator=generator)
    geometry = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    expected = F.conv2d(x, weight, None, **geometry)
    patches = unfold(x, (3, 2), geometry["stride"], geometry["padding"], geometry["dilation"])
    torch.testing.assert_close((weight.flatten(1) @ patches).reshape(expected.shape), expected)
    assert torch.equal(patches, F.unfold(x, (3, 2), (1, 2), (1, 0), (2, 1)))


def test_same_padding_with_an_even_kernel_pads_the_end():
    """PyTorch puts the odd extra row of ``"same"`` at the end of the axis."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=generator)
    weight = torch.randn(3, 2, 4, 2, dtype=torch.float64, generator=generator)
    expected = F.conv2d(x, weight, None, 1, "same", (1, 3))
    patches = unfold(x, (4, 2), (1, 1), "same", (1, 3))
    torch.testing.assert_close((weight.flatten(1) @ patches).reshape(expected.shape), expected)


def test_integer_padding_is_every_axis():
    """The rule passes a plain ``0`` after padding the input itself (``padding_mode``)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64, generator=generator)
    weight = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64, generator=generator)
    expected = F.conv3d(x, weight, None, 1, 1)
    patches = unfold(x, (3, 3, 3), (1, 1, 1), 1, (1, 1, 1))
    torch.testing.assert_close((weight.flatten(1) @ patches).reshape(expected.shape), expected)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5)])
def test_empty_batch_or_channels(shape):
    """``F.unfold``'s shape for zero samples, and the same rule for zero
    channels (the compat helper ``unfold_input`` takes any tensor)."""
    x = torch.randn(*shape)
    patches = unfold(x, (2, 2), (1, 1), (0, 0), (1, 1))
    assert patches.shape == (shape[0], shape[1] * 4, 16)
    if shape[1]:  # F.unfold refuses zero channels
        assert patches.shape == F.unfold(x, 2).shape
