"""BackPACK's ``backpack.utils.convert_parameters``: parameter lists <-> vectors."""

from __future__ import annotations

from typing import Iterable, List

from torch import Tensor
from torch.nn.utils import parameters_to_vector


def vector_to_parameter_list(vec: Tensor, parameters: Iterable[Tensor]) -> List[Tensor]:
    """Views of ``vec`` ``[P]`` shaped like ``parameters`` (in order), which stay unchanged.

    The inverse of :func:`torch.nn.utils.parameters_to_vector`.

    Raises:
        TypeError: If ``vec`` is not a tensor.
        ValueError: If ``vec`` has another number of entries than ``parameters``.
    """
    if not isinstance(vec, Tensor):
        raise TypeError(f"vector_to_parameter_list: expected a Tensor, got {type(vec).__name__}.")
    parameters = list(parameters)
    total = sum(p.numel() for p in parameters)
    if vec.numel() != total:
        raise ValueError(
            f"vector_to_parameter_list: vec has {vec.numel()} entries, the parameters {total}."
        )
    views, start = [], 0
    for param in parameters:
        views.append(vec[start : start + param.numel()].view_as(param).data)
        start += param.numel()
    return views


__all__ = ["parameters_to_vector", "vector_to_parameter_list"]
