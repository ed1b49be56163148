"""BackPACK's ``backpack.custom_module``: parameter-free modules for models
BackPACK could otherwise not extend (branches, permutations, slicing, ...).

curvext needs none of them: it follows any differentiable code between
extended modules (``x.permute(...)``, ``a + b``, ``x[:, 1:]``, ``F.pad``).
They exist so that models built for BackPACK run unchanged, and each is the
plain operation it names, so curvext treats it like the functional call.

====================  ============================================
module                forward
====================  ============================================
``Parallel(*m)``      ``merge(*(m_i(x) for m_i in m))`` (sum)
``SumModule()``       ``x_1 + x_2 + ...`` (equal shapes)
``Permute(*dims)``    ``x.permute(dims)`` (axis 0 stays first)
``ReduceTuple(i)``    ``x[i]`` of a tuple
``ScaleModule(w)``    ``x * w`` (``w`` a float)
``Pad(pad, mode)``    ``torch.nn.functional.pad(x, pad, mode, value)``
``Slicing(index)``    ``x[index]``
====================  ============================================
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence, Tuple, Union

from torch import Tensor, nn
from torch.nn import functional


def _add_children(parent: nn.Module, modules: tuple) -> None:
    """``nn.Sequential``'s arguments: modules, or one ``OrderedDict`` of named ones."""
    if len(modules) == 1 and isinstance(modules[0], OrderedDict):
        for name, module in modules[0].items():
            parent.add_module(name, module)
    else:
        for index, module in enumerate(modules):
            parent.add_module(str(index), module)


class _Branch(nn.Module):
    """Feed one input to every child: ``(m_1(x), m_2(x), ...)``."""

    def __init__(self, *modules: Union["OrderedDict[str, nn.Module]", nn.Module]):
        super().__init__()
        _add_children(self, modules)

    def forward(self, input: Tensor) -> Tuple[Any, ...]:
        return tuple(module(input) for module in self.children())


class SumModule(nn.Module):
    """Sum of its inputs ``x_1 + x_2 + ...``, which must be tensors of one shape."""

    def forward(self, *inputs: Tensor) -> Tensor:
        if not all(isinstance(x, Tensor) for x in inputs):
            raise AssertionError(
                f"SumModule sums tensors, got {[type(x).__name__ for x in inputs]}."
            )
        if len({tuple(x.shape) for x in inputs}) > 1:
            raise AssertionError(
                f"SumModule sums tensors of one shape, got {[tuple(x.shape) for x in inputs]}."
            )
        total = inputs[0]
        for x in inputs[1:]:
            total = total + x
        return total


class Parallel(nn.Module):
    """Branches merged: ``merge(m_1(x), m_2(x), ...)`` (``SumModule`` by default).

    Args:
        *modules: The branches, as for ``nn.Sequential``.
        merge_module: The module combining the branches' outputs.
    """

    def __init__(
        self,
        *modules: Union["OrderedDict[str, nn.Module]", nn.Module],
        merge_module: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.branch = _Branch(*modules)
        self.merge = SumModule() if merge_module is None else merge_module

    def forward(self, input: Tensor) -> Tensor:
        return self.merge(*self.branch(input))


class Permute(nn.Module):
    """``x.permute(dims)``; with ``init_transpose=True``, ``dims`` are the two
    axes to swap. Axis 0 (the samples) must stay first, as in BackPACK.

    Raises:
        ValueError: If the permutation moves axis 0.
    """

    def __init__(self, *dims: int, init_transpose: bool = False):
        super().__init__()
        keeps_samples = (0 not in dims) if init_transpose else (len(dims) > 0 and dims[0] == 0)
        if not keeps_samples:
            raise ValueError(
                f"Permute{dims}: axis 0 holds the samples and must stay first "
                "(BackPACK's rule, kept so that its models behave the same)."
            )
        self.dims = dims
        self.init_transpose = init_transpose

    def forward(self, input: Tensor) -> Tensor:
        if self.init_transpose:
            return input.transpose(*self.dims)
        return input.permute(self.dims)


class ReduceTuple(nn.Module):
    """Element ``index`` of a tuple input (e.g. an RNN's output from ``(output, h)``)."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, input: tuple) -> Any:
        return input[self.index]


class ScaleModule(nn.Module):
    """``x * weight`` for a constant float ``weight``.

    Raises:
        ValueError: If ``weight`` is not a float.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if not isinstance(weight, float):
            raise ValueError(f"ScaleModule(weight={weight!r}): weight must be a float.")
        self.weight = weight

    def forward(self, input: Tensor) -> Tensor:
        return input * self.weight


class Pad(nn.Module):
    """``torch.nn.functional.pad(x, pad, mode, value)`` as a module."""

    def __init__(self, pad: Sequence[int], mode: str = "constant", value: float = 0.0):
        super().__init__()
        self.pad = pad
        self.mode = mode
        self.value = value

    def forward(self, input: Tensor) -> Tensor:
        return functional.pad(input, self.pad, mode=self.mode, value=self.value)


class Slicing(nn.Module):
    """``x[slice_info]`` as a module (keep axis 0 whole: ``(slice(None), ...)``)."""

    def __init__(self, slice_info: Any):
        super().__init__()
        self.slice_info = slice_info

    def forward(self, input: Tensor) -> Tensor:
        return input[self.slice_info]


__all__ = [
    "Parallel",
    "SumModule",
    "Permute",
    "ReduceTuple",
    "ScaleModule",
    "Pad",
    "Slicing",
]
