"""What every benchmark script here shares: timing, peak memory, other load, report lines.

A *cell* is one contender on one row, built before timing: an object with
``unit()`` (the timed work; its return value is kept for agreement checks)
and, optionally, ``clear()`` (untimed, before every unit: gradients, stored
results). The conventions, which every script's docstring relies on:

* **Timing** (:func:`time_cells`): ``args.warmup`` untimed runs of every
  cell, then repeats that run every cell once, the order rotating from one
  repeat to the next so that drift (frequency, other tenants) hits all
  alike; at least ``args.repeats`` repeats, more (up to ``args.max_repeats``)
  while the timed runs took less than ``args.min_time`` s, fewer (at least
  one) once they took ``args.max_time`` s where a script sets it. Scripts
  report medians. On CUDA each unit is bracketed by ``synchronize``.
* **Other load** (:func:`measure_quietly`): the share of all CPUs that other
  processes used while a row was timed; a row above ``args.busy_threshold``
  is timed again after waiting for a quiet moment.
* **Peak memory** (:func:`peak_memory`): the extra memory of one unit over
  what is allocated before it. CUDA: ``torch.cuda.max_memory_allocated()``
  minus ``memory_allocated()`` before the unit, in process. CPU: torch's
  allocations are invisible to ``tracemalloc``, so each cell is measured in
  a fresh process (the script re-invoked with ``--memory-probe SPEC``):
  after one warm-up unit it frees everything, calls ``malloc_trim``, resets
  the peak RSS (``VmHWM``, by writing ``5`` to ``/proc/self/clear_refs``)
  and reports ``VmHWM`` after the unit minus ``VmRSS`` before it (median of
  ``runs``). Where the kernel refuses the reset, it falls back to the peak
  since the process started minus the RSS after setup, which overestimates.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import curvext

PROBE_MARKER = "MEMORY_PROBE_RESULT "


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------
# timing (interleaved, rotating order)
# --------------------------------------------------------------------------
def run_once(cell, device: torch.device) -> Tuple[float, object]:
    """``(seconds, output)`` of one unit of ``cell`` (``clear()`` untimed)."""
    clear = getattr(cell, "clear", None)
    if clear is not None:
        clear()
    sync(device)
    start = time.perf_counter()
    output = cell.unit()
    sync(device)
    return time.perf_counter() - start, output


def time_cells(cells: Dict[str, object], device, args) -> Tuple[Dict[str, List[float]], dict]:
    """Times (ms) per cell, and each cell's output of its last unit."""
    plan, outputs = list(cells.items()), {}
    for _ in range(args.warmup):
        for kind, cell in plan:
            outputs[kind] = run_once(cell, device)[1]
    times: Dict[str, List[float]] = {kind: [] for kind, _ in plan}
    max_time = getattr(args, "max_time", None) or float("inf")
    repeat, spent = 0, 0.0
    while (repeat < args.repeats and (repeat == 0 or spent < max_time)) or (
        spent < args.min_time and repeat < args.max_repeats
    ):
        shift = repeat % len(plan)
        for kind, cell in plan[shift:] + plan[:shift]:
            elapsed, outputs[kind] = run_once(cell, device)
            times[kind].append(1e3 * elapsed)
            spent += elapsed
        repeat += 1
    return times, outputs


# --------------------------------------------------------------------------
# other processes: these scripts are often run on small shared machines
# --------------------------------------------------------------------------
def cpu_jiffies():
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
        self.start, self.clock = cpu_jiffies(), time.perf_counter()

    def stop(self) -> Optional[float]:
        end = cpu_jiffies()
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


def measure_quietly(timed: Callable[[], object], args) -> Tuple[object, Optional[float]]:
    """``(timed(), other load)``, timed again (up to ``args.busy_retries``
    times, after waiting for quiet) while other processes used more than
    ``args.busy_threshold`` of the CPUs."""
    for attempt in range(args.busy_retries + 1):
        meter = ForeignLoad()
        value = timed()
        foreign = meter.stop()
        if foreign is None or foreign <= args.busy_threshold or attempt == args.busy_retries:
            return value, foreign
        print(
            f"  other processes used {100 * foreign:.0f}% of the CPUs; waiting for "
            "quiet and measuring again",
            flush=True,
        )
        wait_for_quiet(args.busy_threshold / 2, timeout=args.quiet_wait)


# --------------------------------------------------------------------------
# peak memory
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


def probe_cpu_peak(make: Callable[[], object], runs: int = 3) -> dict:
    """Body of ``--memory-probe``, in a fresh process: the peak extra RSS
    (bytes) of one unit of the cell ``make()`` builds, median of ``runs``."""
    cell = make()
    _trim()
    after_setup = _proc_status()["VmRSS"]
    output = run_once(cell, torch.device("cpu"))[1]  # warm-up: lazy setup, thread pools
    del output
    can_reset = _reset_peak_rss()
    peaks = []
    for _ in range(runs if can_reset else 1):
        clear = getattr(cell, "clear", None)
        if clear is not None:
            clear()
        _trim()
        before = _proc_status()["VmRSS"]
        if can_reset:
            _reset_peak_rss()
        else:
            before = after_setup
        output = cell.unit()
        peaks.append(_proc_status()["VmHWM"] - before)
        del output
    return {"peak_bytes": statistics.median(peaks), "exact_reset": can_reset}


def run_memory_probe(spec_json: str, make_cell: Callable[[dict, torch.device], object]):
    """What ``--memory-probe SPEC`` prints: ``make_cell(spec, cpu)`` measured
    with ``spec["threads"]`` torch threads and ``spec.get("runs", 3)`` runs."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    result = probe_cpu_peak(lambda: make_cell(spec, torch.device("cpu")), spec.get("runs", 3))
    print(PROBE_MARKER + json.dumps(result))


def peak_memory(script: str, spec: dict, cell, device, runs: int = 3) -> Optional[float]:
    """Peak extra memory (bytes) of one unit of ``cell``: in process on CUDA,
    else in a fresh process running ``script --memory-probe spec``."""
    if device.type == "cuda":
        peaks = []
        for _ in range(runs):
            clear = getattr(cell, "clear", None)
            if clear is not None:
                clear()
            gc.collect()
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            output = cell.unit()
            sync(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
            del output
        return statistics.median(peaks)
    spec = {**spec, "threads": torch.get_num_threads(), "runs": runs}
    command = [sys.executable, os.path.abspath(script), "--memory-probe", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith(PROBE_MARKER):
            return json.loads(line[len(PROBE_MARKER) :])["peak_bytes"]
    sys.stderr.write(f"memory probe failed for {spec}:\n{completed.stderr[-2000:]}\n")
    return None


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    repeats: int,
    warmup: int = 1,
    min_time: float = 1.0,
    max_repeats: int = 21,
    busy_retries: int = 1,
    quiet_wait: float = 20.0,
):
    """The options every script has, with the script's defaults."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument(
        "--min-time",
        type=float,
        default=min_time,
        help="keep repeating a row (up to --max-repeats) until its "
        "timed runs took this many seconds in all",
    )
    parser.add_argument("--max-repeats", type=int, default=max_repeats)
    parser.add_argument(
        "--busy-threshold",
        type=float,
        default=0.15,
        help="a row during which other processes used more than this "
        "fraction of the CPUs is measured again (see --busy-retries)",
    )
    parser.add_argument("--busy-retries", type=int, default=busy_retries)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help="seconds to wait for other processes before a retry",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 warm-up, 2 repeats (memory still measured)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default=None,
        help="markdown file (default benchmarks/results/<name>_<device>.md; "
        "the raw times go next to it as .json)",
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)


def finish_common_arguments(args, name: str, quick_repeats: int = 2):
    """Apply ``--quick`` and the default ``--out``; returns ``args``."""
    if args.quick:
        args.repeats, args.warmup, args.min_time = quick_repeats, 1, 0.0
    if args.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        suffix = "_quick" if args.quick else ""
        args.out = os.path.join(here, "results", f"{name}_{args.device}{suffix}.md")
    return args


def device_for(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    return torch.device(args.device)


def write_report(report: str, raw: dict, out: str):
    """Print ``report`` and write it to ``out``, ``raw`` next to it as JSON."""
    print()
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        handle.write(report)
    raw_path = os.path.splitext(out)[0] + ".json"
    with open(raw_path, "w") as handle:
        json.dump(raw, handle, indent=1, default=str)
    print(f"written to {out} and {raw_path}")


# --------------------------------------------------------------------------
# report lines
# --------------------------------------------------------------------------
def memory_method(device: torch.device, no_memory: bool = False) -> str:
    """How the report's peak memory was measured, in words."""
    if no_memory:
        return "n/a (--no-memory)"
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS in a fresh process per cell"


def version(package: str) -> str:
    from importlib.metadata import version as installed

    return installed(package)


def machine_line(device: torch.device, packages: Tuple[str, ...] = ()) -> str:
    """CPU (and GPU), thread count, and the versions of torch, BackPACK,
    curvext, Python and ``packages``."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"torch {torch.__version__}",
        f"backpack-for-pytorch {version('backpack-for-pytorch')}",
        f"curvext {curvext.__version__}",
        f"Python {platform.python_version()}",
    ] + [f"{package} {version(package)}" for package in packages]
    if device.type == "cuda":
        parts.insert(1, f"GPU: {torch.cuda.get_device_name(device)}")
    return "; ".join(parts)


def source_line() -> str:
    """The git commit of the curvext checkout, and whether curvext/ has edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(curvext.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "curvext"],
            capture_output=True,
            text=True,
            check=True,
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


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def mb(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"
