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
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import backpack as bp
import backpack.extensions as bpx
import curvext
import curvext.extensions as cx

BATCH = 128
NUM_CLASSES = 10
TARGET_RATIO = 0.67
PROBE_MARKER = "MEMORY_PROBE_RESULT "

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
    Row("ggn_exact", "GGNDiag() vs DiagGGNExact()", lambda: cx.GGNDiag(),
        lambda: bpx.DiagGGNExact(), "ggn_diag", "diag_ggn_exact", True, "tensor"),
    Row("ggn_mc", "GGNDiag(mc_samples=1) vs DiagGGNMC(mc_samples=1)",
        lambda: cx.GGNDiag(mc_samples=1), lambda: bpx.DiagGGNMC(mc_samples=1),
        "ggn_diag", "diag_ggn_mc", True, None),
    Row("batch_ggn", "BatchGGNDiag() vs BatchDiagGGNExact()", lambda: cx.BatchGGNDiag(),
        lambda: bpx.BatchDiagGGNExact(), "batch_ggn_diag", "diag_ggn_exact_batch",
        False, "tensor"),
    Row("kfac_mc", 'KFAC(fisher_type="mc") vs KFAC(mc_samples=1)',
        lambda: cx.KFAC(fisher_type="mc"), lambda: bpx.KFAC(mc_samples=1),
        "kfac", "kfac", True, None),
    Row("kfac_t2", 'KFAC(fisher_type="type-2") vs KFLR()',
        lambda: cx.KFAC(fisher_type="type-2"), lambda: bpx.KFLR(),
        "kfac", "kflr", True, "kron"),
    Row("sqrt_exact", "SqrtGGN() vs SqrtGGNExact()", lambda: cx.SqrtGGN(),
        lambda: bpx.SqrtGGNExact(), "sqrt_ggn", "sqrt_ggn_exact", True, "gram"),
    Row("sqrt_mc", "SqrtGGN(mc_samples=1) vs SqrtGGNMC(mc_samples=1)",
        lambda: cx.SqrtGGN(mc_samples=1), lambda: bpx.SqrtGGNMC(mc_samples=1),
        "sqrt_ggn", "sqrt_ggn_mc", True, None),
    Row("batch_grad", "BatchGrad vs BatchGrad", lambda: cx.BatchGrad(),
        lambda: bpx.BatchGrad(), "grad_batch", "grad_batch", False, "tensor"),
    Row("batch_l2", "BatchL2Grad vs BatchL2Grad", lambda: cx.BatchL2Grad(),
        lambda: bpx.BatchL2Grad(), "batch_l2", "batch_l2", False, "tensor"),
    Row("sgs", "SumGradSquared vs SumGradSquared", lambda: cx.SumGradSquared(),
        lambda: bpx.SumGradSquared(), "sum_grad_squared", "sum_grad_squared",
        False, "tensor"),
    Row("variance", "Variance vs Variance", lambda: cx.Variance(),
        lambda: bpx.Variance(), "variance", "variance", False, "tensor"),
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


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extension_for(row: Row, kind: str):
    if kind == "curvext" and row.curvext is not None:
        return row.curvext(), [row.cx_field]
    if kind == "backpack" and row.backpack is not None:
        return row.backpack(), [row.bp_field]
    return None, []


# --------------------------------------------------------------------------
# timing (interleaved, median)
# --------------------------------------------------------------------------
def time_row(contenders: Dict[str, Contender], row: Row, data, device, args):
    """Times (ms) per contender; contenders run in turn, the order rotating.

    At least ``args.repeats`` repeats, more (up to ``args.max_repeats``) while
    the timed runs of the row took less than ``args.min_time`` seconds in all.
    """
    inputs, targets = data
    plan = []
    for kind, contender in contenders.items():
        extension, fields = extension_for(row, kind)
        contender.fields = fields
        plan.append((kind, contender, extension))

    def run(contender, extension):
        contender.clear()
        sync(device)
        start = time.perf_counter()
        contender.unit(inputs, targets, extension)
        sync(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for _, contender, extension in plan:
            run(contender, extension)
    times = {kind: [] for kind, _, _ in plan}
    repeat, spent = 0, 0.0
    while repeat < args.repeats or (spent < args.min_time and repeat < args.max_repeats):
        shift = repeat % len(plan)
        for kind, contender, extension in plan[shift:] + plan[:shift]:
            elapsed = run(contender, extension)
            times[kind].append(1e3 * elapsed)
            spent += elapsed
        repeat += 1
    return times


# --------------------------------------------------------------------------
# agreement check (results of the last timed run are still on the parameters)
# --------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _kron_rel(cx_factors, bp_factors) -> float:
    """Relative error of kron(*factors) without forming it (up to factor scaling)."""
    if len(cx_factors) != len(bp_factors):
        return float("inf")
    worst, scale_cx, scale_bp = 0.0, 1.0, 1.0
    for a, b in zip(cx_factors, bp_factors):
        na, nb = a.double().norm(), b.double().norm()
        worst = max(worst, _rel(a / na, b / nb))
        scale_cx, scale_bp = scale_cx * float(na), scale_bp * float(nb)
    return max(worst, abs(scale_cx - scale_bp) / max(scale_bp, 1e-30))


def _paired_params(contenders: Dict[str, Contender]):
    """(module, curvext parameter, BackPACK parameter) for every parameter."""
    modules = zip(contenders["curvext"].model.modules(),
                  contenders["backpack"].model.modules())
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
            worst = max(worst, _rel(_ggn_block_probe(a), _ggn_block_probe(b)))
        elif a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        else:
            worst = max(worst, _rel(a, b))
    return f"{worst:.0e}" + (" (Linear only)" if skipped else "")


# --------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------
def _proc_status() -> Dict[str, int]:
    """VmRSS and VmHWM of this process in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_cuda(contender: Contender, row: Row, data, device, runs=3) -> float:
    """Peak extra CUDA memory (bytes) of the unit, in process."""
    extension, fields = extension_for(row, contender.kind)
    contender.fields = fields
    peaks = []
    for _ in range(runs):
        contender.clear()
        gc.collect()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        contender.unit(*data, extension)
        sync(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    contender.clear()
    return statistics.median(peaks)


def memory_probe(spec: dict) -> dict:
    """Body of ``--memory-probe``: one (contender, model, extension) on CPU."""
    device = torch.device("cpu")
    torch.set_num_threads(spec["threads"])
    row = ROWS_BY_KEY[spec["row"]]
    contender = make_contenders(spec["model"], device, spec["seed"], [spec["kind"]])[
        spec["kind"]
    ]
    data = make_data(device, spec["seed"])
    extension, fields = extension_for(row, spec["kind"])
    contender.fields = fields
    _trim()
    after_setup = _proc_status()["VmRSS"]
    contender.unit(*data, extension)  # warm-up: lazy initialisation, thread pools
    can_reset = _reset_peak_rss()
    peaks = []
    for _ in range(3 if can_reset else 1):
        contender.clear()
        _trim()
        before = _proc_status()["VmRSS"]
        if can_reset:
            _reset_peak_rss()
        else:
            before = after_setup
        contender.unit(*data, extension)
        peaks.append(_proc_status()["VmHWM"] - before)
    return {"peak_bytes": statistics.median(peaks), "exact_reset": can_reset}


def peak_cpu_subprocess(kind: str, model: str, row: Row, seed: int) -> Optional[float]:
    spec = {"kind": kind, "model": model, "row": row.key, "seed": seed,
            "threads": torch.get_num_threads()}
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe",
               json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith(PROBE_MARKER):
            return json.loads(line[len(PROBE_MARKER):])["peak_bytes"]
    sys.stderr.write(f"memory probe failed for {spec}:\n{result.stderr[-2000:]}\n")
    return None


# --------------------------------------------------------------------------
# other processes: this script is often run on small shared machines
# --------------------------------------------------------------------------
def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        with open("/proc/self/stat") as own:
            own_fields = own.read().rsplit(")", 1)[1].split()
        busy = sum(fields) - fields[3] - fields[4]  # minus idle, iowait
        return busy, int(own_fields[11]) + int(own_fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class ForeignLoad:
    """Fraction of all CPUs that other processes used since construction."""

    def __init__(self):
        self.start, self.clock = _cpu_jiffies(), time.perf_counter()

    def stop(self) -> Optional[float]:
        end = _cpu_jiffies()
        if self.start is None or end is None:
            return None
        seconds = time.perf_counter() - self.clock
        ticks = os.sysconf("SC_CLK_TCK")
        foreign = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, foreign / ticks / (seconds * os.cpu_count()))


def wait_for_quiet(threshold: float, timeout: float, window: float = 2.0):
    """Sleep until other processes use less than ``threshold`` of the CPUs."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        meter = ForeignLoad()
        time.sleep(window)
        load = meter.stop()
        if load is None or load < threshold:
            return True
    return False


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import version

    parts = [
        f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"torch {torch.__version__}",
        f"backpack-for-pytorch {version('backpack-for-pytorch')}",
        f"curvext {curvext.__version__}",
        f"Python {platform.python_version()}",
    ]
    if device.type == "cuda":
        parts.insert(1, f"GPU: {torch.cuda.get_device_name(device)}")
    return "; ".join(parts)


def source_line() -> str:
    """The git commit of the curvext checkout, and whether curvext/ has edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(curvext.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "curvext"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"curvext from {root} (not a git checkout)"
    edits = " plus uncommitted changes in curvext/" if dirty else ""
    return f"curvext at commit {commit}{edits}"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "n/a"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _mb(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


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
        + (f"(more, up to {args.max_repeats}, while a row's timed runs took less "
           f"than {args.min_time:g} s) " if args.min_time > 0 else "")
        + f"after {args.warmup} warm-up runs each (repeats per row: column `n`). Unit = forward + loss + backward inside "
        "the extension context. Peak MB = extra memory of one unit over what "
        "is allocated before it ("
        + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
           else "peak RSS in a fresh process per cell")
        + f"). Target: ratio <= {TARGET_RATIO} on the rows marked.",
        "",
        "Models: " + "; ".join(
            f"`{name}` = {MODEL_DESCRIPTIONS[name]}" for name in args.models
        ) + ".",
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
            f"{result['backpack_ms']:.2f} | {ratio:.2f} | {_mb(result['curvext_mem'])} | "
            f"{_mb(result['backpack_mem'])} | {mark} | {len(result['times_ms']['curvext'])} "
            f"| {_pct(result['foreign_load'])} | {result['agreement']} |"
        )
        if "torch_ms" in result:
            notes.append(
                f"- `{result['model']}`: plain PyTorch (model not extended) "
                f"{result['torch_ms']:.2f} ms, peak {_mb(result['torch_mem'])} MB."
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None,
                        help="markdown file (default benchmarks/results/engine_<device>.md)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument("--rows", default=",".join(r.key for r in ROWS),
                        help="comma-separated row keys: " + ",".join(r.key for r in ROWS))
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="keep repeating a row (up to --max-repeats) until its "
                        "timed runs took this many seconds in all")
    parser.add_argument("--max-repeats", type=int, default=31)
    parser.add_argument("--busy-threshold", type=float, default=0.15,
                        help="a row during which other processes used more than this "
                        "fraction of the CPUs is measured again (see --busy-retries)")
    parser.add_argument("--busy-retries", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="seconds to wait for other processes before a retry")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 warm-up, 2 repeats (memory still measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.min_time = 2, 1, 0.0
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [ROWS_BY_KEY[key] for key in args.rows.split(",") if key]
    if args.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        suffix = "_quick" if args.quick else ""
        args.out = os.path.join(here, "results", f"engine_{args.device}{suffix}.md")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe is not None:
        print(PROBE_MARKER + json.dumps(memory_probe(json.loads(args.memory_probe))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
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
            for attempt in range(args.busy_retries + 1):
                meter = ForeignLoad()
                times = time_row(contenders, row, data, device, args)
                foreign = meter.stop()
                if foreign is None or foreign <= args.busy_threshold:
                    break
                if attempt < args.busy_retries:
                    print(f"  other processes used {100 * foreign:.0f}% of the CPUs "
                          "during this row; waiting for quiet and measuring again",
                          flush=True)
                    wait_for_quiet(args.busy_threshold / 2, timeout=args.quiet_wait)
            ms = {kind: statistics.median(values) for kind, values in times.items()}
            result = {"model": model_name, "row": row, "times_ms": times,
                      "foreign_load": foreign,
                      "curvext_ms": ms["curvext"], "backpack_ms": ms["backpack"],
                      "agreement": agreement(contenders, row)}
            if "torch" in ms:
                result["torch_ms"] = ms["torch"]
            for kind in kinds:
                mem = None
                if args.no_memory:
                    pass
                elif device.type == "cuda":
                    mem = peak_cuda(contenders[kind], row, data, device)
                else:
                    mem = peak_cpu_subprocess(kind, model_name, row, args.seed)
                result[f"{kind}_mem"] = mem
            results.append(result)
            print(f"{model_name:4s} {row.label:50s} x{len(times['curvext']):<3d}"
                  f"curvext {ms['curvext']:8.2f} ms  "
                  f"BackPACK {ms['backpack']:8.2f} ms  ratio "
                  f"{ms['curvext'] / ms['backpack']:.2f}  "
                  f"mem {_mb(result['curvext_mem'])} / {_mb(result['backpack_mem'])} MB  "
                  f"diff {result['agreement']}  other load {_pct(foreign)}", flush=True)
            del contenders
            gc.collect()

    report = render(results, args, device, started, time.perf_counter() - clock)
    print()
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        out.write(report)
    raw = {
        "machine": machine_line(device),
        "source": args.source,
        "args": {k: v for k, v in vars(args).items() if k not in ("rows",)},
        "results": [
            {**{k: v for k, v in r.items() if k != "row"}, "row": r["row"].key,
             "label": r["row"].label}
            for r in results
        ],
    }
    raw_path = os.path.splitext(args.out)[0] + ".json"
    with open(raw_path, "w") as out:
        json.dump(raw, out, indent=1)
    print(f"written to {args.out} and {raw_path}")


if __name__ == "__main__":
    main()
