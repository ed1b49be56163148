"""BackPACK's ``backpack.core.derivatives``: names that import, internals that refuse.

BackPACK computes with one derivative class per module type
(``LinearDerivatives``, ``Conv2DDerivatives``, ...); curvext computes with
rules (:mod:`curvext.rules`) and autograd's own backward. So that code
importing them (BackPACK's test helpers, module extensions written for
BackPACK) loads, every ``backpack.core.derivatives.<module>`` of BackPACK 1.7
resolves to this module, and every ``...Derivatives`` name in it is a class
that refuses to be constructed, saying what curvext offers instead.

``weight_jac_t_save_memory`` (``backpack.core.derivatives.convnd``): BackPACK
chooses between two algorithms for the transposed weight Jacobian of
convolutions with it; curvext's convolution rule has one (unfolded inputs,
computed once per backward), so the switch is accepted and changes nothing.
"""

from __future__ import annotations

from typing import Dict

#: The modules of ``backpack.core.derivatives`` in BackPACK 1.7.
DERIVATIVE_MODULES = (
    "adaptive_avg_pool_nd avgpool1d avgpool2d avgpool3d avgpoolnd basederivatives "
    "batchnorm_nd bcewithlogitsloss conv1d conv2d conv3d conv_transpose1d "
    "conv_transpose2d conv_transpose3d conv_transposend convnd crossentropyloss dropout "
    "elementwise elu embedding flatten leakyrelu linear logsigmoid lstm maxpool1d "
    "maxpool2d maxpool3d maxpoolnd mseloss nll_base pad permute relu rnn scale_module "
    "selu shape_check sigmoid slicing sum_module tanh zeropad2d"
).split()


class _InternalDerivatives:
    """A BackPACK derivative class: importable and subclassable, refused when built."""

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        raise NotImplementedError(
            f"{name} is one of BackPACK's internal derivative classes, which curvext "
            "does not have: curvext computes every extension from its rules "
            "(curvext.rules, one per module type) and autograd's own backward. For your "
            "own module type, give curvext a rule with curvext.rules.register_rule; for "
            "Jacobian products use curvext.compat.backpack.hessianfree (R_op, L_op) or "
            "curvext.operators."
        )


_STUBS: Dict[str, type] = {}


def __getattr__(name: str) -> type:
    """``from backpack.core.derivatives.linear import LinearDerivatives``: a
    refusing class per name ending in ``Derivatives``."""
    if not name.endswith("Derivatives"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _STUBS:
        _STUBS[name] = type(name, (_InternalDerivatives,), {"__module__": __name__})
    return _STUBS[name]


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


__all__ = ["weight_jac_t_save_memory", "DERIVATIVE_MODULES"]
