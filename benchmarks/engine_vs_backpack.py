"""Time and measure curvext against BackPACK, extension by extension.

Run from the repository root::

    python benchmarks/engine_vs_backpack.py                      # CPU, full
    python benchmarks/engine_vs_backpack.py --device cuda        # GPU
    python benchmarks/engine_vs_backpack.py --quick              # smoke run
    python benchmarks/engine_vs_backpack.py --rows diag_h,batch_diag_h   # Hessian rows only

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
* ``cnn-cifar``: the ``cnn`` layout on CIFAR-sized inputs ``[128, 3, 32, 32]``
  with ``padding=1``: Conv2d(3, 16, 3, padding=1), ReLU, MaxPool2d(2),
  Conv2d(16, 32, 3, padding=1), ReLU, MaxPool2d(2), Flatten,
  Linear(32*8*8, 10) -- 25,578 parameters. It checks that the engine's
  chunk size (``curvext.push.CHUNK_BYTES``) is not tuned to the MNIST CNN:
  a backpropagated column holds 1.7 times the recorded module outputs of
  ``cnn`` per sample (24,586 entries instead of 14,698).
* ``mlp-sigmoid``, ``cnn-tanh``: the same with Sigmoid, resp. Tanh, instead
  of ReLU (same parameters).

Rows and models: every row names the models it runs on, and ``--models``
(default all four) and ``--rows`` (default all) select among those pairs.
The GGN, KFAC, SqrtGGN and first-order rows (and the plain backward) run on
``mlp``, ``cnn`` and ``cnn-cifar``; the Hessian rows
(``diag_h``: ``DiagHessian()`` vs ``DiagHessian()``, ``batch_diag_h``:
``BatchDiagHessian()`` vs ``BatchDiagHessian()``, target ratio <= 0.67 AND
no more peak memory than BackPACK) run on ``mlp-sigmoid`` and ``cnn-tanh``
only: on a ReLU network the Hessian diagonal is the GGN diagonal (ReLU's
second derivative is zero almost everywhere), so they would repeat
``ggn_exact``/``batch_ggn``. Asking for a row on none of its models (say
``--models mlp --rows diag_h``) is an error.

Batch of the Hessian rows on ``cnn-tanh``: 2, not 128, on every device (the
model column says ``cnn-tanh (batch 2)``). BackPACK's ``DiagHessian``/``BatchDiagHessian``
push, for every activation, the square root of its diagonal second-order
term as a dense ``[F, N, F]`` tensor (F = features per sample of the
activation), split into a positive and a negative part, through the layers
below it. The first Tanh of the CNN has F = 16*26*26 = 10,816, so at batch
128 that tensor alone is 10,816^2 * 128 * 4 B = 60 GB; measured on CPU
(peak RSS over the setup, one unit), BackPACK needs about 1.7 GB per sample
(1.7 GB at batch 1, 3.4 GB at 2, 6.7 GB at 4) and several seconds per sample
on 2 cores. Batch 2 is the smallest batch at which the per-sample
(sign-split) terms and ``BatchDiagHessian`` differ from batch 1's trivial
case, fits a machine with 8 GB, and keeps the row to minutes. The
``mlp-sigmoid`` rows (F = 256 and 128) use batch 128 like every other row.

Slow rows: a row stops repeating (after at least one repeat) once its timed
runs took ``--max-time`` seconds (default 60; no ReLU row comes near it), and
a cell whose median unit exceeds 2 s gets its peak memory from 1 unit instead
of the median of 3.
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
from dataclasses import field as dataclass_field
from typing import Callable, Dict, List, Optional, Tuple

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
ACTIVATIONS = {
    "mlp": nn.ReLU,
    "cnn": nn.ReLU,
    "cnn-cifar": nn.ReLU,
    "mlp-sigmoid": nn.Sigmoid,
    "cnn-tanh": nn.Tanh,
}
# what the GGN, KFAC, SqrtGGN and first-order rows run on
BASE_MODELS = ("mlp", "cnn", "cnn-cifar")
CURVED_MODELS = ("mlp-sigmoid", "cnn-tanh")  # what the Hessian rows run on
# batch of the Hessian rows on cnn-tanh: BackPACK needs ~1.7 GB per sample (docstring)
HESSIAN_CNN_BATCH = 2
SINGLE_PROBE_SECONDS = 2.0  # a cell whose median unit is slower: memory from 1 unit


def _description(name: str) -> str:
    act = ACTIVATIONS[name].__name__
    if name == "cnn-cifar":
        return (
            f"Conv2d(3,16,3,padding=1), {act}, MaxPool2d(2), Conv2d(16,32,3,padding=1), "
            f"{act}, MaxPool2d(2), Flatten, Linear(2048,10) on inputs [N, 3, 32, 32]"
        )
    if name.startswith("mlp"):
        return f"Flatten, Linear(784,256), {act}, Linear(256,128), {act}, Linear(128,10)"
    return (
        f"Conv2d(1,16,3), {act}, MaxPool2d(2), Conv2d(16,32,3), {act}, MaxPool2d(2), "
        "Flatten, Linear(800,10)"
    )


MODEL_DESCRIPTIONS = {name: _description(name) for name in ACTIVATIONS}


def build_model(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown model {name!r}; use one of {sorted(MODEL_DESCRIPTIONS)}")
    act = ACTIVATIONS[name]
    if name == "cnn-cifar":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            act(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, NUM_CLASSES),
        )
    if name.startswith("mlp"):
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            act(),
            nn.Linear(256, 128),
            act(),
            nn.Linear(128, NUM_CLASSES),
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, NUM_CLASSES),
    )


def input_shape(model: str) -> Tuple[int, ...]:
    """Shape of one input sample of ``model``."""
    return (3, 32, 32) if model == "cnn-cifar" else (1, 28, 28)


def make_data(device: torch.device, seed: int, batch: int = BATCH, model: str = "mlp"):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, *input_shape(model), generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
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
    models: Tuple[str, ...] = BASE_MODELS  # the models the row runs on
    batches: Dict[str, int] = dataclass_field(default_factory=dict)  # per model, else BATCH
    memory_target: bool = False  # the target also asks for no more peak memory

    def batch(self, model: str) -> int:
        return self.batches.get(model, BATCH)


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
    Row(
        "diag_h",
        "DiagHessian() vs DiagHessian()",
        lambda: cx.DiagHessian(),
        lambda: bpx.DiagHessian(),
        "hessian_diag",
        "diag_h",
        True,
        "tensor",
        models=CURVED_MODELS,
        batches={"cnn-tanh": HESSIAN_CNN_BATCH},
        memory_target=True,
    ),
    Row(
        "batch_diag_h",
        "BatchDiagHessian() vs BatchDiagHessian()",
        lambda: cx.BatchDiagHessian(),
        lambda: bpx.BatchDiagHessian(),
        "batch_hessian_diag",
        "diag_h_batch",
        True,
        "tensor",
        models=CURVED_MODELS,
        batches={"cnn-tanh": HESSIAN_CNN_BATCH},
        memory_target=True,
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
    row = ROWS_BY_KEY[spec["row"]]
    contender = make_contenders(spec["model"], device, spec["seed"], [spec["kind"]])
    data = make_data(device, spec["seed"], row.batch(spec["model"]), spec["model"])
    return Cell(contender[spec["kind"]], row, data)


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


def per_parameter_diffs(contenders: Dict[str, Contender], row: Row) -> Optional[Dict[str, float]]:
    """``||curvext - BackPACK|| / ||BackPACK||`` per parameter (``"tensor"`` rows
    only; kept in the raw ``.json``)."""
    if row.compare != "tensor":
        return None
    diffs = {}
    pairs = zip(
        contenders["curvext"].model.named_parameters(),
        contenders["backpack"].model.named_parameters(),
    )
    for (name, p_cx), (_, p_bp) in pairs:
        a, b = getattr(p_cx, row.cx_field, None), getattr(p_bp, row.bp_field, None)
        if a is not None and b is not None and a.shape == b.shape:
            diffs[name] = rel_diff(a, b)
    return diffs


def verdict(result: dict) -> str:
    """``meets``/``**misses**`` the target (rows without one: empty); the
    Hessian rows also ask for no more peak memory than BackPACK."""
    row = result["row"]
    if not row.target:
        return ""
    fast = result["curvext_ms"] / result["backpack_ms"] <= TARGET_RATIO
    lean = (
        not row.memory_target
        or result["curvext_mem"] is None
        or result["backpack_mem"] is None
        or result["curvext_mem"] <= result["backpack_mem"]
    )
    if fast and lean:
        return "meets"
    if not row.memory_target:
        return "**misses**"
    return "**misses** (" + " and ".join(["time"] * (not fast) + ["memory"] * (not lean)) + ")"


def model_cell(result: dict) -> str:
    batch = result["batch"]
    return result["model"] + (f" (batch {batch})" if batch != BATCH else "")


def render(results, args, device, started, elapsed) -> str:
    models = [m for m in MODEL_DESCRIPTIONS if any(r["model"] == m for r in results)]
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
        f"Run {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s: batch {BATCH} (unless the "
        "model column names another), float32, "
        f"CrossEntropyLoss, median of at least {args.repeats} interleaved repeats "
        + (
            f"(more, up to {args.max_repeats}, while a row's timed runs took less "
            f"than {args.min_time:g} s; "
            if args.min_time > 0
            else "("
        )
        + f"fewer, at least 1, once they took {args.max_time:g} s) "
        + f"after {args.warmup} warm-up runs each (repeats per row: column `n`). "
        "Unit = forward + loss + backward inside "
        "the extension context. Peak MB = extra memory of one unit over what "
        "is allocated before it ("
        + memory_method(device)
        + f"; one unit instead of the median of 3 where the unit took over "
        f"{SINGLE_PROBE_SECONDS:g} s). Target: ratio <= {TARGET_RATIO} on the rows "
        "marked; for the Hessian rows also no more peak memory than BackPACK.",
        "",
        "Models: " + "; ".join(f"`{name}` = {MODEL_DESCRIPTIONS[name]}" for name in models) + ".",
        "",
        "| model | extension | curvext ms | BackPACK ms | ratio (curvext/BackPACK) "
        "| curvext peak MB | BackPACK peak MB | target | n | other load | max rel. diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    notes = []
    for result in results:
        row = result["row"]
        ratio = result["curvext_ms"] / result["backpack_ms"]
        lines.append(
            f"| {model_cell(result)} | {row.label} | {result['curvext_ms']:.2f} | "
            f"{result['backpack_ms']:.2f} | {ratio:.2f} | {mb(result['curvext_mem'])} | "
            f"{mb(result['backpack_mem'])} | {verdict(result)} | "
            f"{len(result['times_ms']['curvext'])} "
            f"| {pct(result['foreign_load'])} | {result['agreement']} |"
        )
        if "torch_ms" in result:
            notes.append(
                f"- `{result['model']}`: plain PyTorch (model not extended) "
                f"{result['torch_ms']:.2f} ms, peak {mb(result['torch_mem'])} MB."
            )
    if any(r["batch"] != BATCH for r in results):
        notes.append(
            f"- Hessian rows on `cnn-tanh`: batch {HESSIAN_CNN_BATCH}, because BackPACK's "
            "DiagHessian/BatchDiagHessian push a dense `[F, N, F]` square root of each "
            "activation's second-order term (F = 16*26*26 = 10,816 at the first Tanh): "
            "about 1.7 GB per sample, 60 GB at batch 128."
        )
    lines += [
        "",
        "Ratio < 1 means curvext is faster. `max rel. diff`: largest relative "
        "difference ||curvext - BackPACK|| / ||BackPACK|| over the parameters "
        "(KFAC: of the Kronecker product, from the normalised factors and their "
        "norms); MC rows draw different samples and are not compared. The "
        "plain-backward row runs both extended models outside any extension "
        "context (the cost of the hooks). The Hessian rows run on the Sigmoid/Tanh "
        "models only (on ReLU models the Hessian diagonal is the GGN diagonal). "
        "`other load`: share of all CPUs that "
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
    parser.add_argument(
        "--max-time",
        type=float,
        default=60.0,
        help="stop repeating a row (after at least one repeat) once its timed runs "
        "took this many seconds: the cnn-tanh Hessian rows take seconds per unit",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODEL_DESCRIPTIONS),
        help="comma-separated: " + ",".join(MODEL_DESCRIPTIONS) + " (each row runs only "
        "on its own models: the Hessian rows on mlp-sigmoid,cnn-tanh, the others on "
        "mlp,cnn,cnn-cifar)",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated row keys (default: all, each on its models among --models): "
        + ",".join(r.key for r in ROWS),
    )
    args = finish_common_arguments(parser.parse_args(argv), "engine")
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODEL_DESCRIPTIONS]
    if unknown:
        parser.error(f"unknown models {unknown}; use some of {','.join(MODEL_DESCRIPTIONS)}")
    explicit = args.rows is not None
    keys = [key for key in (args.rows or ",".join(ROWS_BY_KEY)).split(",") if key]
    unknown = [key for key in keys if key not in ROWS_BY_KEY]
    if unknown:
        parser.error(f"unknown rows {unknown}; use some of {','.join(ROWS_BY_KEY)}")
    args.rows = [ROWS_BY_KEY[key] for key in keys]
    idle = [row for row in args.rows if not set(row.models) & set(args.models)]
    if args.memory_probe is None and (explicit and idle or len(idle) == len(args.rows)):
        parser.error(
            "; ".join(f"row {row.key} runs on {','.join(row.models)} only" for row in idle)
            + f", and --models is {','.join(args.models)}"
        )
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
        for row in args.rows:
            if model_name not in row.models:
                continue
            batch = row.batch(model_name)
            data = make_data(device, args.seed, batch, model_name)
            kinds = ["curvext", "backpack"] + (["torch"] if row.key == "none" else [])
            contenders = make_contenders(model_name, device, args.seed, kinds)
            cells = {kind: Cell(contender, row, data) for kind, contender in contenders.items()}
            (times, _), foreign = measure_quietly(
                functools.partial(time_cells, cells, device, args), args
            )
            ms = {kind: statistics.median(values) for kind, values in times.items()}
            result = {
                "model": model_name,
                "batch": batch,
                "row": row,
                "times_ms": times,
                "foreign_load": foreign,
                "curvext_ms": ms["curvext"],
                "backpack_ms": ms["backpack"],
                "agreement": agreement(contenders, row),
                "diffs": per_parameter_diffs(contenders, row),
            }
            if "torch" in ms:
                result["torch_ms"] = ms["torch"]
            for kind, cell in cells.items():
                spec = {"kind": kind, "model": model_name, "row": row.key, "seed": args.seed}
                runs = 1 if ms[kind] > 1e3 * SINGLE_PROBE_SECONDS else 3
                result[f"{kind}_mem"] = (
                    None if args.no_memory else peak_memory(__file__, spec, cell, device, runs)
                )
            results.append(result)
            print(
                f"{model_cell(result):22s} {row.label:50s} x{len(times['curvext']):<3d}"
                f"curvext {ms['curvext']:9.2f} ms  "
                f"BackPACK {ms['backpack']:9.2f} ms  ratio "
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
