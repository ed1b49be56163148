r"""Log the top of the GGN spectrum, its trace and gradient noise while training.

A training loop uses :class:`EigenLogger` in two lines::

    logger = EigenLogger("curvature.jsonl", top_k=5, every=10)
    for X, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(X), y)
        with backpack(*logger.extensions()):   # empty on steps not logged
            loss.backward()
        logger.step(loss)                      # reads the results, writes a record
        optimizer.step()

On a logged step :meth:`EigenLogger.extensions` returns a
:class:`~curvext.extensions.GGNEigen` (``eigenvectors=False``) and a
:class:`~curvext.extensions.noise.GradientNoise`; on the other steps it returns
nothing, and ``backpack()`` without extensions costs nothing beyond a plain
backward pass.

**What a record holds** (one per logged step and parameter group):

* ``top_eigvals``: the ``top_k`` largest eigenvalues of the group's GGN
  block, **largest first** (as everywhere in curvext: column ``top_eigval_1``
  of a log means :math:`\lambda_{\max}` in every row, whatever the rank of
  the batch's GGN).
  Fewer than ``top_k`` when the GGN of the batch has lower rank (CSV: empty
  cells).
* ``rank``: the number of nonzero eigenvalues (above GGNEigen's documented
  threshold), at most ``N·K``.
* ``trace``: :math:`\operatorname{tr} G` of the group's GGN block, the sum of
  **all** nonzero eigenvalues of the Gram matrix (:math:`\operatorname{tr} V^\top
  V = \operatorname{tr} V V^\top`), not only of the logged ones; the
  eigenvalues dropped as zero are rounding noise. With ``mc_samples=M > 0``
  it is the trace of the Monte-Carlo GGN, an unbiased estimate of the trace.
  It equals the sum of ``GGNDiag``'s ``p.ggn_diag`` over the group.
* ``grad_norm_sq``, ``sample_grad_norm_sq``, ``grad_variance``,
  ``noise_scale``: gradient-noise statistics of the group, defined in
  :mod:`curvext.extensions.noise`.
* ``step`` (the count of :meth:`EigenLogger.step` calls before this one),
  ``group``, ``batch_size``, ``loss`` (if given to :meth:`EigenLogger.step`).

Records go to a JSON-lines file (one object per line) or, for a path ending
in ``.csv``, to a CSV file; both are written and flushed as they come. They
are also kept in :attr:`EigenLogger.records`, and go to TensorBoard with
``tensorboard=True`` (or a log directory).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from curvext.extensions.ggn_eigen import GGNEigen
from curvext.extensions.noise import GradientNoise

#: Statistics of :mod:`curvext.extensions.noise`, in the order of the CSV columns.
NOISE_FIELDS = ("grad_norm_sq", "sample_grad_norm_sq", "grad_variance", "noise_scale")


class EigenLogger:
    r"""Record GGN eigenvalues, trace and gradient noise every ``every`` steps.

    Args:
        path: File to write records to: JSON lines, or CSV if it ends in
            ``.csv``. ``None`` keeps them in :attr:`records` only. An existing
            file is overwritten.
        top_k: Number of largest eigenvalues logged per group (default 5).
        every: Log every ``every``-th step, starting with the first (steps
            ``0, every, 2·every, …``). Default 1.
        mc_samples: 0 (default) for the exact GGN; ``M > 0`` for its
            Monte-Carlo estimate with ``M`` samples, whose Gram matrix is
            ``N·M`` wide instead of ``N·(C−1)`` for ``C`` classes (much
            cheaper for many classes; the top eigenvalues of an MC estimate
            are biased upwards).
        param_groups: As for :class:`~curvext.extensions.GGNEigen`: one record
            per group, each for the group's GGN block. Default: one group, the
            full GGN of every trainable parameter in the loss's graph.
        noise: Whether to log gradient-noise statistics (default ``True``).
        tensorboard: ``True`` to log scalars to TensorBoard in ``runs/``
            (``torch.utils.tensorboard.SummaryWriter``'s default), a directory
            name to log there, or a ``SummaryWriter``. Default ``False``.

    The logger's ``GGNEigen`` stores ``p.ggn_eigvals`` (all nonzero
    eigenvalues) on logged steps; do not put a second ``GGNEigen`` in the same
    ``backpack`` context (the context refuses two extensions that store the
    same attribute).

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
        ...                                    torch.nn.Linear(6, 3)))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> logger = EigenLogger(path=None, top_k=2, every=2)
        >>> for step in range(3):
        ...     loss = loss_fn(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))
        ...     with backpack(*logger.extensions()):
        ...         loss.backward()
        ...     _ = logger.step(loss)
        >>> [record["step"] for record in logger.records]
        [0, 2]
        >>> len(logger.records[0]["top_eigvals"]), logger.records[0]["rank"] <= 8 * 2
        (2, True)
    """

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        top_k: int = 5,
        every: int = 1,
        mc_samples: int = 0,
        param_groups: Optional[Sequence[Dict[str, Any]]] = None,
        noise: bool = True,
        tensorboard: Union[bool, str, os.PathLike, Any] = False,
    ):
        for name, value in (("top_k", top_k), ("every", every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"EigenLogger({name}={value!r}) is invalid: use a positive integer."
                )
        self.path = None if path is None else os.fspath(path)
        self.top_k, self.every = top_k, every
        self.mc_samples, self.param_groups = mc_samples, param_groups
        self.noise = bool(noise)
        # validates mc_samples and param_groups now, not at the first logged step
        GGNEigen(mc_samples=mc_samples, param_groups=param_groups, eigenvectors=False)
        self.records: List[Dict[str, Any]] = []
        self.num_steps = 0
        self._active: Optional[List] = None
        self._file = None
        self._csv = None
        self._writer = _summary_writer(tensorboard)

    # ------------------------------------------------------------------
    # the two lines of the training loop
    # ------------------------------------------------------------------
    def logs_this_step(self) -> bool:
        """Whether the current step (the next :meth:`step`) is logged."""
        return self.num_steps % self.every == 0

    def extensions(self) -> List:
        """The extensions to activate in this step's ``backpack`` context.

        Empty on steps that are not logged. Calling it twice in one step
        returns the same extensions.
        """
        if not self.logs_this_step():
            return []
        if self._active is None:
            self._active = [
                GGNEigen(
                    mc_samples=self.mc_samples,
                    param_groups=self.param_groups,
                    eigenvectors=False,
                )
            ]
            if self.noise:
                self._active.append(GradientNoise())
        return list(self._active)

    def step(self, loss: Optional[Union[Tensor, float]] = None) -> Optional[List[Dict[str, Any]]]:
        """Record this step (if it is logged) and advance the step counter.

        Call it after ``loss.backward()``. Returns the step's records (one per
        group), or ``None`` on a step that is not logged.
        """
        records = None
        if self.logs_this_step():
            if self._active is None:
                raise RuntimeError(
                    f"EigenLogger.step(): step {self.num_steps} is logged (every="
                    f"{self.every}) but logger.extensions() was not called for it. Run "
                    "`with backpack(*logger.extensions()): loss.backward()` before "
                    "logger.step()."
                )
            eigen = self._active[0]
            if not eigen.has_result:
                raise RuntimeError(
                    f"EigenLogger.step(): step {self.num_steps} is logged but no "
                    "backward pass ran with logger.extensions() active. Run "
                    "`with backpack(*logger.extensions()): loss.backward()` before "
                    "logger.step()."
                )
            records = self._records(eigen, loss)
            self._active = None
            for record in records:
                self._write(record)
            self.records.extend(records)
        self.num_steps += 1
        return records

    def _records(self, eigen: GGNEigen, loss) -> List[Dict[str, Any]]:
        noise = self._active[1] if self.noise else None
        loss = None if loss is None else float(torch.as_tensor(loss).detach())
        records = []
        for group in range(eigen.num_groups):
            evals, _ = eigen.result(group)
            evals = evals.detach().double().cpu()
            record = {
                "step": self.num_steps,
                "group": group,
                "batch_size": _batch_size(noise),
                "loss": loss,
                "rank": len(evals),
                "trace": float(evals.sum()),
                "top_eigvals": evals[: self.top_k].tolist(),
            }
            if noise is not None:
                record.update(noise.statistics(eigen.params(group)))
            records.append(record)
        return records

    # ------------------------------------------------------------------
    # output
    # ------------------------------------------------------------------
    def _columns(self) -> List[str]:
        columns = ["step", "group", "batch_size", "loss", "rank", "trace"]
        columns += [f"top_eigval_{i + 1}" for i in range(self.top_k)]
        return columns + (list(NOISE_FIELDS) if self.noise else [])

    def _write(self, record: Dict[str, Any]) -> None:
        if self._writer is not None:
            suffix = (
                "" if record["group"] == 0 and _single_group(self) else f"/group{record['group']}"
            )
            scalars = {f"ggn/trace{suffix}": record["trace"], f"ggn/rank{suffix}": record["rank"]}
            for i, value in enumerate(record["top_eigvals"]):
                scalars[f"ggn/top_eigval_{i + 1}{suffix}"] = value
            for field in NOISE_FIELDS:
                if field in record:
                    scalars[f"noise/{field}{suffix}"] = record[field]
            if record["loss"] is not None and record["group"] == 0:
                scalars["loss"] = record["loss"]
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, record["step"])
            self._writer.flush()
        if self.path is None:
            return
        if self._file is None:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "w", newline="")
            if self.path.endswith(".csv"):
                self._csv = csv.writer(self._file)
                self._csv.writerow(self._columns())
        if self._csv is not None:
            flat = dict(record)
            top = flat.pop("top_eigvals")
            for i in range(self.top_k):
                flat[f"top_eigval_{i + 1}"] = top[i] if i < len(top) else None
            self._csv.writerow(["" if flat.get(c) is None else flat[c] for c in self._columns()])
        else:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file and the TensorBoard writer (records stay in memory)."""
        if self._file is not None:
            self._file.close()
            self._file, self._csv = None, None
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "EigenLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------
    # reading and plotting
    # ------------------------------------------------------------------
    @staticmethod
    def read(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
        """The records of a file written by a logger, as :attr:`records` holds them."""
        path = os.fspath(path)
        with open(path, newline="") as file:
            if not path.endswith(".csv"):
                return [json.loads(line) for line in file if line.strip()]
            records = []
            for row in csv.DictReader(file):
                record: Dict[str, Any] = {}
                top = []
                for key, value in row.items():
                    number = None if value == "" else float(value)
                    if key.startswith("top_eigval_"):
                        if number is not None:
                            top.append(number)
                    elif key in ("step", "group", "batch_size", "rank"):
                        record[key] = int(number)
                    else:
                        record[key] = number
                record["top_eigvals"] = top
                records.append(record)
            return records

    def plot(
        self, path: Union[str, os.PathLike, None] = None, group: int = 0, lr: Optional[float] = None
    ):
        """Draw the logged eigenvalues, trace and noise over steps (:func:`plot_records`).

        Args:
            path: Where to save the image (``None``: not saved).
            group: The parameter group to plot.
            lr: The learning rate of (S)GD: draws its stability limit ``2 / lr``
                on the eigenvalue axis.

        Returns:
            The matplotlib ``Figure``. Needs matplotlib (``pip install
            matplotlib``, or curvext's ``monitor`` extra).
        """
        return plot_records(self.records, path, group=group, lr=lr)


def plot_records(
    records: Sequence[Dict[str, Any]],
    path=None,
    group: int = 0,
    lr: Optional[float] = None,
    average: int = 5,
):
    """Plot records of :class:`EigenLogger` (in memory or :meth:`EigenLogger.read`)
    over the steps; save to ``path`` if given.

    Panels on one step axis: the top eigenvalues, largest first, with the
    stability limit ``2 / lr`` of gradient descent if ``lr`` is given; the
    trace of the GGN on its own axis; if noise was logged, the gradient noise
    scale (per logged batch and its running mean over ``average`` of them).
    An axis is logarithmic, with ticks at 1, 2, 5 × 10^k, where its values span
    a factor of ten or more, linear otherwise; legends sit outside the axes.

    Returns:
        The matplotlib ``Figure`` (made without pyplot: no window opens).

    Raises:
        ValueError: If there is no record of ``group``.
        ImportError: If matplotlib is not installed.
    """
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"EigenLogger.plot(lr={lr!r}): lr is the (S)GD learning rate whose stability "
            "limit 2 / lr is drawn; pass a number > 0, or None to draw no limit."
        )
    if isinstance(average, bool) or not isinstance(average, int) or average < 1:
        raise ValueError(
            f"EigenLogger.plot(average={average!r}): the running mean of the noise scale "
            "covers this many logged steps; pass an int >= 1."
        )
    # nothing to plot is the first thing to say, with or without matplotlib
    records = [record for record in records if record.get("group", 0) == group]
    if not records:
        raise ValueError(
            f"EigenLogger.plot(): no records for group {group} to plot; call "
            "logger.step() after at least one logged backward pass."
        )
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "EigenLogger.plot() needs matplotlib, which is not installed: "
            "pip install matplotlib (curvext's 'monitor' extra)."
        ) from error
    steps = [record["step"] for record in records]
    with_noise = "noise_scale" in records[0]
    figure = Figure(figsize=(8, 7.5 if with_noise else 5.5), layout="constrained")
    axes = figure.subplots(
        3 if with_noise else 2, 1, sharex=True, height_ratios=[2, 1, 1] if with_noise else [2, 1]
    )
    eig_ax, trace_ax = axes[0], axes[1]

    top_k = max(len(record["top_eigvals"]) for record in records)
    eigvals = [
        [r["top_eigvals"][i] if i < len(r["top_eigvals"]) else math.nan for r in records]
        for i in range(top_k)
    ]
    for i, values in enumerate(eigvals):
        label = "$\\lambda_1 = \\lambda_{\\max}$" if i == 0 else f"$\\lambda_{{{i + 1}}}$"
        eig_ax.plot(steps, values, lw=1.8 if i == 0 else 1, label=label, zorder=3 - i / top_k)
    limits = [] if lr is None else [2 / lr]
    for limit in limits:
        eig_ax.axhline(
            limit,
            color="black",
            ls="--",
            lw=1.2,
            label=f"2 / lr = {limit:g}:\nstability limit\nof gradient descent",
        )
    _scale(eig_ax, [v for values in eigvals for v in values] + limits)
    eig_ax.set_ylabel("eigenvalue of the\nmini-batch GGN")
    eig_ax.set_title(f"Top {top_k} eigenvalues, largest first", loc="left", fontsize="medium")
    eig_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small")

    traces = [record["trace"] for record in records]
    trace_ax.plot(steps, traces, color="tab:brown", lw=1.2)
    _scale(trace_ax, traces)
    trace_ax.set_ylabel("tr G")
    trace_ax.set_title("Trace of the mini-batch GGN", loc="left", fontsize="medium")

    if with_noise:
        noise_ax = axes[2]
        noise = [record["noise_scale"] for record in records]
        window = min(average, len(noise))
        running = []
        for i in range(len(noise)):
            # a batch of one sample or a zero gradient logs NaN: left out of the mean
            recent = [v for v in noise[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
            running.append(sum(recent) / len(recent) if recent else math.nan)
        noise_ax.plot(steps, noise, color="tab:gray", lw=0.8, label="per batch")
        noise_ax.plot(
            steps, running, color="black", lw=1.5, label=f"mean of the last\n{window} logged"
        )
        _scale(noise_ax, noise)
        noise_ax.set_ylabel("$B_\\mathrm{simple}$ (samples)")
        noise_ax.set_title(
            "Gradient noise scale $\\mathrm{tr}\\,\\Sigma / \\|g\\|^2$",
            loc="left",
            fontsize="medium",
        )
        noise_ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small"
        )

    batch = records[0].get("batch_size")
    axes[-1].set_xlabel("step" + (f" (mini-batches of {batch})" if batch else ""))
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    figure.suptitle(
        "GGN spectrum, trace"
        + (" and gradient noise" if with_noise else "")
        + " while training"
        + ("" if lr is None else f" (SGD, lr = {lr:g})")
        + (f" (group {group})" if group else "")
    )
    if path is not None:
        figure.savefig(os.fspath(path), dpi=120)
    return figure


def _scale(ax, values):
    """A log axis with ticks at 1, 2, 5 × 10^k over a wide range, else a linear one."""
    from matplotlib import ticker

    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) >= 10:
        # a range of ten or more holds at least three of 1, 2, 5, 10, 20, ...
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _batch_size(noise: Optional[GradientNoise]) -> Optional[int]:
    return None if noise is None else noise.batch_size


def _single_group(logger: EigenLogger) -> bool:
    return logger.param_groups is None or len(logger.param_groups) == 1


def _summary_writer(tensorboard):
    if tensorboard is False or tensorboard is None:
        return None
    if hasattr(tensorboard, "add_scalar"):
        return tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "EigenLogger(tensorboard=...) needs TensorBoard, which is not "
            "installed: pip install tensorboard, or pass tensorboard=False."
        ) from error
    return SummaryWriter() if tensorboard is True else SummaryWriter(os.fspath(tensorboard))


__all__ = ["EigenLogger", "plot_records"]
