"""BackPACK's ``backpack.core.derivatives.convnd.weight_jac_t_save_memory``.

BackPACK chooses between two algorithms for the transposed weight Jacobian of
convolutions with it; curvext's convolution rule has one (unfolded inputs,
computed once per backward), so the switch is accepted and changes nothing.
"""

from __future__ import annotations


class weight_jac_t_save_memory:  # noqa: N801 - BackPACK's name
    """``with weight_jac_t_save_memory(save_memory=True):`` — accepted, no effect."""

    _SAVE_MEMORY = False

    def __init__(self, save_memory: bool = True):
        self._new_save_memory = save_memory

    def __enter__(self):
        self._old_save_memory = weight_jac_t_save_memory._SAVE_MEMORY
        weight_jac_t_save_memory._SAVE_MEMORY = self._new_save_memory
        return self

    def __exit__(self, exc_type, exc, tb):
        weight_jac_t_save_memory._SAVE_MEMORY = self._old_save_memory
        return False


__all__ = ["weight_jac_t_save_memory"]
