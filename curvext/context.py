"""The ``backpack`` context that activates extensions, and ``disable``.

State is thread-local: a backward pass in one thread never sees the
extensions another thread activated.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch

from curvext.extensions.base import GRADIENT, Extension

_state = threading.local()


def active_extensions() -> Tuple[Extension, ...]:
    """Extensions of the innermost active ``backpack`` context (empty if none)."""
    return getattr(_state, "extensions", ())


def recording_enabled() -> bool:
    """Whether forward passes of extended modules are recorded now."""
    return not getattr(_state, "disabled", False)


def current_run_log() -> Optional[list]:
    """List that the engine appends to each time it runs inside the context."""
    return getattr(_state, "run_log", None)


def pending_passes() -> Optional[dict]:
    """Backward passes without an extended loss that the engine completes when
    they end (graph task id → what the first-order extensions read); None
    outside a context and in one without first-order extensions. Dropped with
    the context: a pass that raised keeps what it collected (its output
    gradients) until the context exits, and nothing after."""
    return getattr(_state, "pending", None)


def no_loss_extensions() -> Tuple[Extension, ...]:
    """The active extensions computed on a backward pass without an extended
    loss (first-order ones and those reading no columns), or ``()``."""
    return getattr(_state, "no_loss", ())


def _no_loss_extensions(extensions: Tuple[Extension, ...]) -> Tuple[Extension, ...]:
    chosen = tuple(e for e in extensions if e.any_backward or not e.column_sets())
    reads_gradient = any(e.any_backward and GRADIENT in e.column_sets() for e in chosen)
    return chosen if reads_gradient else ()


#: What the engine appends to the run log for a backward pass that computed
#: first-order extensions without an extended loss.
NO_LOSS_RUN = "<no extended loss>"


def max_columns_per_backward() -> Optional[int]:
    """Largest number of columns pushed through one batched backward, or None."""
    return getattr(_state, "max_columns", None)


class backpack:  # noqa: N801 - lower case like BackPACK's context, users know it
    """Compute the given extensions during ``loss.backward()``.

    Args:
        *extensions: Extension instances, e.g. ``GGNDiag(), KFAC()``.
        max_columns: Largest number of loss-Hessian columns pushed through one
            batched backward. More columns are processed in chunks whose
            results are summed (or concatenated for ``SqrtGGN``). ``None``
            (default) picks a chunk size from the size of the recorded
            module outputs (at most ``curvext.push.CHUNK_BYTES`` = 8 MiB of
            output gradients per chunk: the batched backward of convolutions
            and max-pooling loops over columns and copies, so large chunks
            only cost memory).
        debug: Unused; kept for BackPACK compatibility.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> from curvext.extensions import GGNDiag
        >>> model = extend(torch.nn.Linear(3, 2))
        >>> loss_fn = extend(torch.nn.MSELoss())
        >>> loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 2))
        >>> with backpack(GGNDiag()):
        ...     loss.backward()
        >>> model.weight.ggn_diag.shape
        torch.Size([2, 3])
    """

    def __init__(self, *extensions: Extension, max_columns: Optional[int] = None, debug=False):
        for ext in extensions:
            if isinstance(ext, type):
                raise TypeError(
                    f"backpack() got the class {ext.__name__}, not an instance. "
                    f"Pass {ext.__name__}() instead."
                )
            if not isinstance(ext, Extension):
                raise TypeError(
                    f"backpack() accepts curvext extensions only, got "
                    f"{type(ext).__name__}. Use the classes in curvext.extensions."
                )
        savefields = [ext.savefield for ext in extensions]
        duplicates = {f for f in savefields if savefields.count(f) > 1}
        if duplicates:
            raise ValueError(
                f"backpack() got two extensions that write the same attribute "
                f"{sorted(duplicates)}. Pass each extension once."
            )
        if max_columns is not None and max_columns < 1:
            raise ValueError(f"backpack(max_columns={max_columns}) must be >= 1.")
        self.extensions = tuple(extensions)
        self.max_columns = max_columns

    def __enter__(self):
        # autograd runs the backward of accelerator tensors on worker threads;
        # the hooks must see this thread's state, so backward stays here
        self._single_thread = torch.autograd.set_multithreading_enabled(False)
        self._single_thread.__enter__()
        self._saved = (
            active_extensions(),
            current_run_log(),
            max_columns_per_backward(),
            pending_passes(),
            no_loss_extensions(),
        )
        _state.extensions = self.extensions
        _state.run_log = []
        _state.max_columns = self.max_columns
        # read by the engine's hook on every recorded output node in a backward
        # pass: None makes it return at once for contexts without first-order
        _state.no_loss = _no_loss_extensions(self.extensions)
        _state.pending = {} if _state.no_loss else None
        return self

    def __exit__(self, exc_type, exc, tb):
        run_log = _state.run_log
        (
            _state.extensions,
            _state.run_log,
            _state.max_columns,
            _state.pending,
            _state.no_loss,
        ) = self._saved
        self._single_thread.__exit__(exc_type, exc, tb)
        if exc_type is None and self.extensions:
            _check_computed(self.extensions, run_log)
        return False


def _check_computed(extensions: Tuple[Extension, ...], run_log: list) -> None:
    """Refuse a context whose extensions computed nothing: no backward pass
    reached an extended module, or (for all but the first-order extensions)
    none reached an extended loss."""
    if any(entry != NO_LOSS_RUN for entry in run_log):
        return  # an extended loss was reached: every extension ran
    need_loss = [e for e in extensions if not e.any_backward and e.column_sets()]
    if run_log and not need_loss:
        return
    names = ", ".join(type(e).__name__ for e in (need_loss if run_log else extensions))
    if not need_loss:
        raise RuntimeError(
            f"backpack({names}) computed nothing: no backward pass inside the "
            "context went through a module wrapped with curvext.extend. Call "
            "`model = extend(model)` before the forward pass (outside of "
            "curvext.disable()) and call backward() inside the context."
        )
    raise RuntimeError(
        f"backpack({names}) computed nothing: no backward pass inside the "
        "context went through a loss function wrapped with "
        "curvext.extend whose input a model computed. Call `loss_fn = "
        "extend(loss_fn)` on a torch.nn loss module (MSELoss, "
        "CrossEntropyLoss, BCEWithLogitsLoss), pass it the output of a model "
        "wrapped with extend (an input that is a leaf tensor, created with "
        "requires_grad=True, has no parameters before it), and call "
        "loss.backward() inside the context (first-order extensions such as "
        "BatchGrad need no extended loss; the others need the loss's curvature)."
    )


@contextmanager
def disable() -> Iterator[None]:
    """Stop recording the forward passes of extended modules.

    Inside this context the forward hooks of extended modules do nothing, so a
    forward pass costs what it costs without curvext; a backward pass through
    such a forward computes no extension.
    """
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous
