"""The engine's fixed cost per backward pass, measured without arithmetic.

The benchmark MLP shrunk until a step is nothing but hooks, Python and kernel
launches (Flatten, Linear(8, 8), ReLU, Linear(8, 8), ReLU, Linear(8, 3) on a
batch of 4, ``CrossEntropyLoss``, one torch thread). Each row times one unit
(``zero_grad``, forward, loss, backward inside the extension context) of:

* ``plain``: the model in plain PyTorch (not extended, no context);
* ``curvext``: the extended model with the row's extension;
* ``against``: the same with another curvext tree (``--against PATH``, a
  directory holding a ``curvext`` package, e.g. from ``git archive REV
  curvext | tar -x -C PATH``), loaded in the same process under another
  package name, so that two versions are compared without the drift of a
  shared machine between processes;
* ``BackPACK``: BackPACK's counterpart, where it has one.

The fixed cost of a library is its time minus ``plain``. Interleaved repeats
with rotating order and medians (``benchmarks/harness.py``); no peak memory
(nothing here allocates more than a few kB). From the repository root::

    python benchmarks/fixed_cost.py
    python benchmarks/fixed_cost.py --against /tmp/old   # A/B with another tree
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import (  # noqa: E402
    add_common_arguments,
    finish_common_arguments,
    load_average,
    machine_line,
    source_line,
    time_cells,
    write_report,
)

import curvext  # noqa: E402

OTHER = "curvext_against"


def load_other(path: str):
    """The ``curvext`` package under ``path``, imported as :data:`OTHER`
    (a copy with its own imports renamed)."""
    target = os.path.join(tempfile.mkdtemp(), OTHER)
    shutil.copytree(os.path.join(path, "curvext"), target)
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                file = os.path.join(folder, name)
                with open(file) as handle:
                    text = handle.read()
                text = re.sub(r"\bcurvext\b(?=[.\s])", OTHER, text)
                with open(file, "w") as handle:
                    handle.write(text)
    sys.path.insert(0, os.path.dirname(target))
    return importlib.import_module(OTHER)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )


ROWS = {
    # name: (curvext extension, BackPACK extension class name and arguments)
    "none": (None, None),
    "ggn_mc": (("GGNDiag", {"mc_samples": 1}), ("DiagGGNMC", {"mc_samples": 1})),
    "ggn_exact": (("GGNDiag", {}), ("DiagGGNExact", {})),
    "kfac_mc": (("KFAC", {"fisher_type": "mc"}), ("KFAC", {"mc_samples": 1})),
    "batch_l2": (("BatchL2Grad", {}), ("BatchL2Grad", {})),
    "logged": ("logger", None),
}
LABELS = {
    "none": "extended model, no context",
    "ggn_mc": "GGNDiag(mc_samples=1) vs DiagGGNMC(mc_samples=1)",
    "ggn_exact": "GGNDiag() vs DiagGGNExact()",
    "kfac_mc": 'KFAC(fisher_type="mc") vs KFAC(mc_samples=1)',
    "batch_l2": "BatchL2Grad vs BatchL2Grad",
    "logged": "EigenLogger(top_k=5, mc_samples=1), a logged SGD step",
}


class Step:
    """One contender on one row (a harness cell)."""

    def __init__(self, library, row: str, data):
        self.X, self.y = data
        self.library = library
        kind = ROWS[row][0]
        if library is None:  # plain PyTorch
            self.model, self.loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
        else:
            self.model = library.extend(tiny_mlp())
            self.loss_fn = library.extend(nn.CrossEntropyLoss())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.logger, self.extension = None, None
        self.sgd = kind == "logger"  # the logged row times a whole SGD step
        if kind == "logger" and library is not None:
            monitor = importlib.import_module(f"{library.__name__}.monitor")
            self.logger = monitor.EigenLogger(None, top_k=5, mc_samples=1, every=1)
        elif kind is not None and library is not None:
            name, options = kind
            self.extension = getattr(
                importlib.import_module(f"{library.__name__}.extensions"), name
            )(**options)

    def unit(self):
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(self.X), self.y)
        if self.logger is not None:
            with self.library.backpack(*self.logger.extensions()):
                loss.backward()
            self.logger.step(loss)
            self.optimizer.step()
            self.logger.records.clear()
        elif self.extension is None:
            loss.backward()
            if self.sgd:
                self.optimizer.step()
        else:
            with self.library.backpack(self.extension):
                loss.backward()


class BackpackStep:
    def __init__(self, row: str, data):
        import backpack as bp
        from backpack import extensions

        self.bp, (self.X, self.y) = bp, data
        name, options = ROWS[row][1]
        self.extension = getattr(extensions, name)(**options)
        self.model, self.loss_fn = bp.extend(tiny_mlp()), bp.extend(nn.CrossEntropyLoss())

    def unit(self):
        self.model.zero_grad()
        loss = self.loss_fn(self.model(self.X), self.y)
        with self.bp.backpack(self.extension):
            loss.backward()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=300, warmup=50, min_time=0.0, max_repeats=300)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--against", default=None, help="a directory with another curvext/")
    args = finish_common_arguments(parser.parse_args(argv), "fixed_cost")
    args.rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.device != "cpu":
        parser.error("the fixed cost is measured on CPU (one thread): --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    other = load_other(args.against) if args.against else None
    torch.manual_seed(0)
    data = (torch.randn(4, 8), torch.randint(0, 3, (4,)))
    print(machine_line(device), source_line(), f"load average: {load_average()}", sep="\n")
    started, load_before, results = time.time(), load_average(), []
    for row in args.rows:
        cells = {"plain": Step(None, row, data), "curvext": Step(curvext, row, data)}
        if other is not None:
            cells["against"] = Step(other, row, data)
        if ROWS[row][1] is not None:
            cells["BackPACK"] = BackpackStep(row, data)
        times, _ = time_cells(cells, device, args)
        median = {kind: 1e3 * statistics.median(values) for kind, values in times.items()}
        results.append((row, median, len(times["plain"])))
        print(row, "  ".join(f"{kind} {us:.0f} us" for kind, us in median.items()))

    against = f"`against` = curvext from `{args.against}`; " if other is not None else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    lines = [
        "# The engine's fixed cost per backward (cpu, one thread)",
        "",
        f"Machine: {machine_line(device)}",
        "",
        f"Source: {source_line()}. {against}Run {stamp}, {time.time() - started:.0f} s; "
        f"load average at start {load_before}, at end {load_average()}.",
        "",
        "Model: Flatten, Linear(8,8), ReLU, Linear(8,8), ReLU, Linear(8,3), batch 4, "
        "CrossEntropyLoss, float32. Unit = zero_grad, forward, loss, backward in the "
        "context (the logged row: EigenLogger's extensions, logger.step, SGD step). "
        "Median µs of interleaved repeats (rotating order); fixed cost = time − plain.",
        "",
        "| row | plain µs | curvext µs | curvext fixed µs |"
        + (" against µs | against fixed µs | curvext / against |" if other else "")
        + " BackPACK µs | BackPACK fixed µs | n |",
        "| --- | ---: | ---: | ---: |"
        + (" ---: | ---: | ---: |" if other else "")
        + " ---: | ---: | ---: |",
    ]
    for row, median, repeats in results:
        plain, ours = median["plain"], median["curvext"]
        cells = [LABELS[row], f"{plain:.0f}", f"{ours:.0f}", f"{ours - plain:.0f}"]
        if other is not None:
            theirs = median["against"]
            cells += [f"{theirs:.0f}", f"{theirs - plain:.0f}", f"{ours / theirs:.2f}"]
        backpack = median.get("BackPACK")
        cells += ["", ""] if backpack is None else [f"{backpack:.0f}", f"{backpack - plain:.0f}"]
        lines.append("| " + " | ".join(cells + [str(repeats)]) + " |")
    raw = {"rows": [{"row": row, "median_us": median} for row, median, _ in results]}
    write_report("\n".join(lines) + "\n", raw, args.out)


if __name__ == "__main__":
    main()
