"""Work-arounds for PyTorch's own noise, applied inside curvext's calls only."""

from __future__ import annotations

import warnings

import torch

_loaded = False


def load_forward_ad_quietly() -> None:
    """Load PyTorch's forward-mode AD decompositions without its warning.

    The first ``torch.func.jvp`` or ``forward_ad.make_dual`` of a process
    loads ``torch._decomp.decompositions_for_jvp``, which calls
    ``torch.jit.script`` and makes torch 2.14 print a ``FutureWarning``
    ("``torch.jit.script`` is deprecated") — on every rank under torchrun,
    for code the user did not write. Loading them here, with that one
    warning filtered, keeps it out of curvext's products; the user's own
    warnings filters are untouched.
    """
    global _loaded
    if _loaded:
        return
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
            )
            load()
    _loaded = True
