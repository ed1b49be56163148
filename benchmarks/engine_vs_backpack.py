"""Time and measure curvext against BackPACK, extension by extension.

Run from the repository root::

    python benchmarks/engine_vs_backpack.py                      # CPU, full
    python benchmarks/engine_vs_backpack.py --device cuda        # GPU
    python benchmarks/engine_vs_backpack.py --quick              # smoke run

Both contenders live in ONE process and see the same weights and the same
data. The timed unit is ``forward + loss + backward`` with the extension
active (``with backpack(ext): loss.backward()``); gradients and the stored
results are cleared, untimed, before every run. After ``--warmup`` untimed
runs of each contender, every repeat runs each contender once, alternating
the order from one repeat to the next, so that drift (thermal, frequency,
other tenants) affects both alike. The reported time is the median over
repeats.

Peak memory is the extra memory the timed unit needs on top of what is
allocated before it starts (model, data):

* CUDA: ``torch.cuda.max_memory_allocated()`` minus
  ``torch.cuda.memory_allocated()`` before the unit, measured in process.
* CPU: torch's CPU allocations are invisible to ``tracemalloc``, so every
  (contender, model, extension) is measured in a fresh subprocess (this
  script re-invoked with ``--memory-probe``): after one warm-up run the
  probe frees everything, calls ``malloc_trim``, resets the peak RSS
  (``VmHWM``, by writing ``5`` to ``/proc/self/clear_refs``) and reports
  ``VmHWM`` after the unit minus ``VmRSS`` before it (median of 3). Where
  the kernel refuses the reset, the probe falls back to the peak since the
  process started minus the RSS after setup, which overestimates.

Models (float32, batch 128, random MNIST-sized inputs ``[128, 1, 28, 28]``,
10 classes, ``CrossEntropyLoss``; no downloads):

* ``mlp``: Flatten, Linear(784, 256), ReLU, Linear(256, 128), ReLU,
  Linear(128, 10) -- 235,146 parameters.
* ``cnn``: Conv2d(1, 16, 3), ReLU, MaxPool2d(2), Conv2d(16, 32, 3), ReLU,
  MaxPool2d(2), Flatten, Linear(32*5*5, 10) -- 12,810 parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import backpack as bp
import backpack.extensions as bpx
import torch
from harness import (
    add_common_arguments,
    device_for,
    finish_common_arguments,
    load_average,
    machine_line,
    mb,
    measure_quietly,
    memory_method,
    pct,
    peak_memory,
    rel_diff,
    run_memory_probe,
    source_line,
    time_cells,
    write_report,
)
from torch import nn

import curvext
import curvext.extensions as cx

BATCH = 128
NUM_CLASSES = 10
TARGET_RATIO = 0.67

# BackPACK's full backward hooks warn on the first layer (its input needs no grad)
warnings.filterwarnings("ignore", message="Full backward hook is firing")


# --------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------
MODEL_DESCRIPTIONS = {
    "mlp": "Flatten, Linear(784,256), ReLU, Linear(256,128), ReLU, Linear(128,10)",
    "cnn": (
        "Conv2d(1,16,3), ReLU, MaxPool2d(2), Conv2d(16,32,3), ReLU, MaxPool2d(2), "
        "Flatten, Linear(800,10)"
    ),
}


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 5 * 5, NUM_CLASSES),
        )
    raise ValueError(f"unknown model {name!r}; use one of {sorted(MODEL_DESCRIPTIONS)}")


def make_data(device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH, 1, 28, 28, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    return inputs.to(device), targets.to(device)


# --------------------------------------------------------------------------
# extensions: one row per pair
# --------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    label: str
    curvext: Optional[Callable]  # factory of the curvext extension
    backpack: Optional[Callable]  # factory of the BackPACK extension
    cx_field: Optional[str]
    bp_field: Optional[str]
    target: bool  # ratio <= TARGET_RATIO is the goal
    # how to check agreement: "tensor", "kron", "gram" (V^T V probed: the exact
    # square roots have C-1 (curvext) and C (BackPACK) columns), None (MC)
    compare: Optional[str]


ROWS: List[Row] = [
    Row("none", "plain backward (no extension)", None, None, None, None, False, None),
    Row(
        "ggn_exact",
        "GGNDiag() vs DiagGGNExact()",
        lambda: cx.GGNDiag(),
        lambda: bpx.DiagGGNExact(),
        "ggn_diag",
        "diag_ggn_exact",
        True,
        "tensor",
    ),
    Row(
        "ggn_mc",
        "GGNDiag(mc_samples=1) vs DiagGGNMC(mc_samples=1)",
        lambda: cx.GGNDiag(mc_samples=1),
        lambda: bpx.DiagGGNMC(mc_samples=1),
        "ggn_diag",
        "diag_ggn_mc",
        True,
        None,
    ),
    Row(
        "batch_ggn",
        "BatchGGNDiag() vs BatchDiagGGNExact()",
        lambda: cx.BatchGGNDiag(),
        lambda: bpx.BatchDiagGGNExact(),
        "batch_ggn_diag",
        "diag_ggn_exact_batch",
        False,
        "tensor",
    ),
    Row(
        "kfac_mc",
        'KFAC(fisher_type="mc") vs KFAC(mc_samples=1)',
        lambda: cx.KFAC(fisher_type="mc"),
        lambda: bpx.KFAC(mc_samples=1),
        "kfac",
        "kfac",
        True,
        None,
    ),
    Row(
        "kfac_t2",
        'KFAC(fisher_type="type-2") vs KFLR()',
        lambda: cx.KFAC(fisher_type="type-2"),
        lambda: bpx.KFLR(),
        "kfac",
        "kflr",
        True,
        "kron",
    ),
    Row(
        "sqrt_exact",
        "SqrtGGN() vs SqrtGGNExact()",
        lambda: cx.SqrtGGN(),
        lambda: bpx.SqrtGGNExact(),
        "sqrt_ggn",
        "sqrt_ggn_exact",
        True,
        "gram",
    ),
    Row(
        "sqrt_mc",
        "SqrtGGN(mc_samples=1) vs SqrtGGNMC(mc_samples=1)",
        lambda: cx.SqrtGGN(mc_samples=1),
        lambda: bpx.SqrtGGNMC(mc_samples=1),
        "sqrt_ggn",
        "sqrt_ggn_mc",
        True,
        None,
    ),
    Row(
        "batch_grad",
        "BatchGrad vs BatchGrad",
        lambda: cx.BatchGrad(),
        lambda: bpx.BatchGrad(),
        "grad_batch",
        "grad_batch",
        False,
        "tensor",
    ),
    Row(
        "batch_l2",
        "BatchL2Grad vs BatchL2Grad",
        lambda: cx.BatchL2Grad(),
        lambda: bpx.BatchL2Grad(),
        "batch_l2",
        "batch_l2",
        False,
        "tensor",
    ),
    Row(
        "sgs",
        "SumGradSquared vs SumGradSquared",
        lambda: cx.SumGradSquared(),
        lambda: bpx.SumGradSquared(),
        "sum_grad_squared",
        "sum_grad_squared",
        False,
        "tensor",
    ),
    Row(
        "variance",
        "Variance vs Variance",
        lambda: cx.Variance(),
        lambda: bpx.Variance(),
        "variance",
        "variance",
        False,
        "tensor",
    ),
]
ROWS_BY_KEY = {row.key: row for row in ROWS}


# --------------------------------------------------------------------------
# contenders
# --------------------------------------------------------------------------
class Contender:
    """A model + loss extended by one library, and how to run its unit."""

    def __init__(self, kind: str, model: nn.Module, device: torch.device):
        self.kind = kind  # "curvext", "backpack" or "torch"
        model = model.to(device)
        loss_fn = nn.CrossEntropyLoss().to(device)
        if kind == "curvext":
            model, loss_fn = curvext.extend(model), curvext.extend(loss_fn)
        elif kind == "backpack":
            model, loss_fn = bp.extend(model), bp.extend(loss_fn)
        self.model, self.loss_fn = model, loss_fn
        self.fields: List[str] = []

    def context(self, extension):
        if extension is None:
            return contextlib.nullcontext()
        if self.kind == "curvext":
            return curvext.backpack(extension)
        return bp.backpack(extension)

    def clear(self):
        """Drop gradients and stored results (untimed, before every unit)."""
        for param in self.model.parameters():
            param.grad = None
            for field in self.fields:
                if hasattr(param, field):
                    delattr(param, field)

    def unit(self, inputs, targets, extension):
        """The timed unit: forward, loss, backward with ``extension`` active."""
        loss = self.loss_fn(self.model(inputs), targets)
        with self.context(extension):
            loss.backward()


def make_contenders(model_name: str, device: torch.device, seed: int, kinds):
    torch.manual_seed(seed)
    base = build_model(model_name)
    # copies first: extend() installs hooks on the module it is given
    return {kind: Contender(kind, copy.deepcopy(base), device) for kind in kinds}


def extension_for(row: Row, kind: str):
    if kind == "curvext" and row.curvext is not None:
        return row.curvext(), [row.cx_field]
    if kind == "backpack" and row.backpack is not None:
        return row.backpack(), [row.bp_field]
    return None, []


class Cell:
    """One contender with the row's extension bound: a harness cell."""

    def __init__(self, contender: Contender, row: Row, data):
        self.contender, self.data = contender, data
        self.extension, contender.fields = extension_for(row, contender.kind)

    def clear(self):
        self.contender.clear()

    def unit(self):
        self.contender.unit(*self.data, self.extension)


def make_cell(spec: dict, device: torch.device) -> Cell:
    """The cell of ``--memory-probe``: one (contender, model, row)."""
    contender = make_contenders(spec["model"], device, spec["seed"], [spec["kind"]])
    return Cell(contender[spec["kind"]], ROWS_BY_KEY[spec["row"]], make_data(device, spec["seed"]))


# --------------------------------------------------------------------------
# agreement check (results of the last timed run are still on the parameters)
# --------------------------------------------------------------------------
def _kron_rel(cx_factors, bp_factors) -> float:
    """Relative error of kron(*factors) without forming it (up to factor scaling)."""
    if len(cx_factors) != len(bp_factors):
        return float("inf")
    worst, scale_cx, scale_bp = 0.0, 1.0, 1.0
    for a, b in zip(cx_factors, bp_factors):
        na, nb = a.double().norm(), b.double().norm()
        worst = max(worst, rel_diff(a / na, b / nb))
        scale_cx, scale_bp = scale_cx * float(na), scale_bp * float(nb)
    return max(worst, abs(scale_cx - scale_bp) / max(scale_bp, 1e-30))


def _paired_params(contenders: Dict[str, Contender]):
    """(module, curvext parameter, BackPACK parameter) for every parameter."""
    modules = zip(contenders["curvext"].model.modules(), contenders["backpack"].model.modules())
    for m_cx, m_bp in modules:
        for name, p_cx in m_cx._parameters.items():
            if p_cx is not None and p_cx.requires_grad:
                yield m_cx, p_cx, m_bp._parameters[name]


def _ggn_block_probe(sqrt_ggn: torch.Tensor) -> torch.Tensor:
    """``V^T V R`` for a fixed random ``R [P, 4]`` (float64): the GGN block that
    ``[K, N, *p.shape]`` columns represent, probed without forming it."""
    columns = sqrt_ggn.double().flatten(2)  # [K, N, P]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(columns.shape[-1], 4, generator=generator, dtype=torch.float64)
    projected = torch.einsum("knp,pr->knr", columns, probe.to(columns.device))
    return torch.einsum("knp,knr->pr", columns, projected)


def agreement(contenders: Dict[str, Contender], row: Row) -> str:
    """Largest relative difference between the results, as a short string.

    KFAC factors are compared on Linear layers only: for convolutions BackPACK
    (KFAC/KFLR) sums the output-side columns over positions before the outer
    product and uses ``A = sum_t a a^T / N``, while curvext's default
    ``kfac_approx="expand"`` uses ``G = sum_t g g^T`` and
    ``A = sum_t a a^T / (N T)``, so the two products differ by design.
    """
    if row.compare is None:
        return "MC" if row.curvext is not None else ""
    worst, skipped = 0.0, False
    for module, p_cx, p_bp in _paired_params(contenders):
        a, b = getattr(p_cx, row.cx_field, None), getattr(p_bp, row.bp_field, None)
        if a is None or b is None:
            return "missing"
        if row.compare == "kron":
            if not isinstance(module, nn.Linear):
                skipped = True
                continue
            worst = max(worst, _kron_rel(a, b))
        elif row.compare == "gram":
            worst = max(worst, rel_diff(_ggn_block_probe(a), _ggn_block_probe(b)))
        elif a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        else:
            worst = max(worst, rel_diff(a, b))
    return f"{worst:.0e}" + (" (Linear only)" if skipped else "")


def render(results, args, device, started, elapsed) -> str:
    lines = [
        f"# curvext vs BackPACK ({device.type})",
        "",
        f"Machine: {machine_line(device)}",
        "",
        f"Source: {args.source}.",
        "",
        f"Load average (1, 5, 15 min) at start: {args.load_start}; at end: "
        f"{load_average()} (other processes on the machine distort timings).",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s: batch {BATCH}, float32, "
        f"CrossEntropyLoss, median of at least {args.repeats} interleaved repeats "
        + (
            f"(more, up to {args.max_repeats}, while a row's timed runs took less "
            f"than {args.min_time:g} s) "
            if args.min_time > 0
            else ""
        )
        + f"after {args.warmup} warm-up runs each (repeats per row: column `n`). "
        "Unit = forward + loss + backward inside "
        "the extension context. Peak MB = extra memory of one unit over what "
        "is allocated before it ("
        + memory_method(device)
        + f"). Target: ratio <= {TARGET_RATIO} on the rows marked.",
        "",
        "Models: "
        + "; ".join(f"`{name}` = {MODEL_DESCRIPTIONS[name]}" for name in args.models)
        + ".",
        "",
        "| model | extension | curvext ms | BackPACK ms | ratio (curvext/BackPACK) "
        "| curvext peak MB | BackPACK peak MB | target | n | other load | max rel. diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    notes = []
    for result in results:
        row = result["row"]
        ratio = result["curvext_ms"] / result["backpack_ms"]
        if row.target:
            mark = "meets" if ratio <= TARGET_RATIO else "**misses**"
        else:
            mark = ""
        lines.append(
            f"| {result['model']} | {row.label} | {result['curvext_ms']:.2f} | "
            f"{result['backpack_ms']:.2f} | {ratio:.2f} | {mb(result['curvext_mem'])} | "
            f"{mb(result['backpack_mem'])} | {mark} | {len(result['times_ms']['curvext'])} "
            f"| {pct(result['foreign_load'])} | {result['agreement']} |"
        )
        if "torch_ms" in result:
            notes.append(
                f"- `{result['model']}`: plain PyTorch (model not extended) "
                f"{result['torch_ms']:.2f} ms, peak {mb(result['torch_mem'])} MB."
            )
    lines += [
        "",
        "Ratio < 1 means curvext is faster. `max rel. diff`: largest relative "
        "difference ||curvext - BackPACK|| / ||BackPACK|| over the parameters "
        "(KFAC: of the Kronecker product, from the normalised factors and their "
        "norms); MC rows draw different samples and are not compared. The "
        "plain-backward row runs both extended models outside any extension "
        "context (the cost of the hooks). `other load`: share of all CPUs that "
        "other processes used while the row was timed (rows above "
        f"{100 * args.busy_threshold:.0f}% were retried up to {args.busy_retries} "
        "times after waiting for quiet; a high value means the row is unreliable).",
        "",
        *notes,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser, repeats=7, warmup=2, min_time=2.0, max_repeats=31, busy_retries=3, quiet_wait=120.0
    )
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument(
        "--rows",
        default=",".join(r.key for r in ROWS),
        help="comma-separated row keys: " + ",".join(r.key for r in ROWS),
    )
    args = finish_common_arguments(parser.parse_args(argv), "engine")
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [ROWS_BY_KEY[key] for key in args.rows.split(",") if key]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe is not None:
        return run_memory_probe(args.memory_probe, make_cell)
    device = device_for(args)
    started, clock = datetime.datetime.utcnow(), time.perf_counter()
    print(machine_line(device), flush=True)
    args.load_start = load_average()
    args.source = source_line()
    print(args.source, flush=True)
    print(f"load average: {args.load_start}", flush=True)

    results = []
    for model_name in args.models:
        data = make_data(device, args.seed)
        for row in args.rows:
            kinds = ["curvext", "backpack"] + (["torch"] if row.key == "none" else [])
            contenders = make_contenders(model_name, device, args.seed, kinds)
            cells = {kind: Cell(contender, row, data) for kind, contender in contenders.items()}
            (times, _), foreign = measure_quietly(
                functools.partial(time_cells, cells, device, args), args
            )
            ms = {kind: statistics.median(values) for kind, values in times.items()}
            result = {
                "model": model_name,
                "row": row,
                "times_ms": times,
                "foreign_load": foreign,
                "curvext_ms": ms["curvext"],
                "backpack_ms": ms["backpack"],
                "agreement": agreement(contenders, row),
            }
            if "torch" in ms:
                result["torch_ms"] = ms["torch"]
            for kind, cell in cells.items():
                spec = {"kind": kind, "model": model_name, "row": row.key, "seed": args.seed}
                result[f"{kind}_mem"] = (
                    None if args.no_memory else peak_memory(__file__, spec, cell, device)
                )
            results.append(result)
            print(
                f"{model_name:4s} {row.label:50s} x{len(times['curvext']):<3d}"
                f"curvext {ms['curvext']:8.2f} ms  "
                f"BackPACK {ms['backpack']:8.2f} ms  ratio "
                f"{ms['curvext'] / ms['backpack']:.2f}  "
                f"mem {mb(result['curvext_mem'])} / {mb(result['backpack_mem'])} MB  "
                f"diff {result['agreement']}  other load {pct(foreign)}",
                flush=True,
            )
            del contenders, cells
            gc.collect()

    report = render(results, args, device, started, time.perf_counter() - clock)
    raw = {
        "machine": machine_line(device),
        "source": args.source,
        "args": {k: v for k, v in vars(args).items() if k not in ("rows",)},
        "results": [
            {
                **{k: v for k, v in r.items() if k != "row"},
                "row": r["row"].key,
                "label": r["row"].label,
            }
            for r in results
        ],
    }
    write_report(report, raw, args.out)


if __name__ == "__main__":
    main()
