"""Time and measure curvext's matrix-free operators, estimators and dattri-style IHVPs
against peers.

Run from the repository root::

    python benchmarks/matrix_free_vs_peers.py                      # CPU, full (<= 8 min on 2 cores)
    python benchmarks/matrix_free_vs_peers.py --device cuda        # GPU
    python benchmarks/matrix_free_vs_peers.py --quick --no-memory  # smoke run
    python benchmarks/matrix_free_vs_peers.py --quick --models mlp --rows ggn_1,dattri_cg

Needs ``curvlinops-for-pytorch`` (3.0.1) and ``dattri`` (0.3.0). Conventions
are those of ``engine_vs_backpack.py``, whose models, helpers and report
lines this script imports: the contenders live in one process, on the same
model and data; after a warm-up run every repeat runs each contender once,
the order rotating; the table reports medians. Everything a user builds once
(the operators, with ``check_deterministic=False`` for both libraries, the
probe vectors) is built before timing; the timed unit is the computation.
Peak memory is the extra memory of one unit over what is allocated before
it: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS
(``VmHWM`` after a reset through ``/proc/self/clear_refs``) over the RSS
before the unit, in a fresh process per cell (this script re-invoked with
``--memory-probe``), after one warm-up unit, median of 3 units (1 unit where
the timed unit took more than 2 s, to keep the run short).

**Rows** (float32, ``CrossEntropyLoss(reduction="mean")``; data: 10 batches
of 128 random MNIST-sized inputs ``[128, 1, 28, 28]``, 10 classes, made here,
nothing downloaded; models ``mlp`` (235,146 parameters) and ``cnn`` (12,810)
of ``engine_vs_backpack.py``):

* ``ggn_1``, ``ggn_16``, ``hess_1``, ``hess_16``: one product of
  ``curvext.operators.GGNOperator`` / ``HessianOperator`` vs curvlinops'
  ``GGNLinearOperator`` / ``HessianLinearOperator`` with one vector ``[P]``
  and with 16 vectors ``[P, 16]`` (one pass over the 10 batches each).
* ``trace``: ``curvext.linalg.hutchinson_trace(G, 16)`` vs curvlinops'
  ``hutchinson_trace(G, 16)`` on the GGN (Rademacher probes; both multiply
  all 16 probes in one ``G @ [P, 16]``).
* ``spectrum``: ``curvext.linalg.lanczos_spectrum(G, ncv=8, num_repeats=2)``
  vs curvlinops' ``lanczos_approximate_spectrum(G, ncv=8, num_repeats=2)``,
  1024 grid points, ``kappa=3``, ``margin=0.05``, and the same
  ``boundaries`` for both, ``(0, λ_max)`` (the GGN is positive
  semi-definite with rank ``<= N (C - 1) < P``; λ_max from 10 Lanczos steps,
  untimed): without them curvlinops would first run
  SciPy's ARPACK for the extreme eigenvalues, while curvext would take the
  extreme Ritz values of its own runs. curvext runs the two repeats as one
  Lanczos process on ``[P, 2]`` (fully reorthogonalised); curvlinops runs
  them one after the other on ``[P]`` (no reorthogonalisation).
* ``dattri_cg``, ``dattri_arnoldi`` (``mlp`` only): the cross-entropy of the
  MLP on the first batch as a function of the flattened parameters
  ``θ [P]`` (``func(θ, X, targets)``, the targets one-hot, since dattri
  differentiates every argument and cannot take integer labels), and
  ``v [4, P]``: ``curvext.functional.ihvp_at_x_cg`` vs dattri's
  ``ihvp_at_x_cg`` (``max_iter=10``, ``regularization=1.0``: the Hessian's smallest
  eigenvalue is about -0.53, so CG needs it; ``rev-rev``;
  curvext's ``tol`` set out of reach so that both run all 10 iterations;
  the unit builds the IHVP function and applies it), and ``ihvp_at_x_arnoldi``
  (``max_iter=30``, ``top_k=10``, ``rev-fwd``, ``regularization=1.0``, same
  seed; the unit builds the function, which runs the iteration in curvext,
  and applies it, which runs the iteration in dattri).

* ``dist_ggn_16`` (``mlp`` only, CPU): the speed-up of 2 processes over 1
  for ``GGNOperator @ V [P, 16]`` on the same 10 batches, with
  ``torch.distributed`` (gloo, ``torch.multiprocessing.spawn``): ``2x1`` = 2
  processes with 1 torch thread each over 5 batches each
  (``batches[rank::2]``), the product all-reduced by curvext.distributed;
  ``1x1`` = 1 process with 1 thread over all 10 batches (the speed-up asked
  for); ``1x2`` = 1 process with 2 threads (the same 2 cores as ``2x1``: the
  fair comparison on a 2-core machine). All three run in one spawn, in
  rotating order, each product between two barriers (``2x1`` includes the
  all-reduce and waiting for the slower rank; for ``1x*`` rank 1 waits,
  idle, in the barrier). Agreement: the 2-process product against the
  1-process one. Its own table; no peak memory.

**Agreement** (last column): relative difference ``||a - b|| / ||b||`` of the
two results where they are deterministic. ``trace`` and ``spectrum`` draw
different random probes in the two libraries: the column gives the relative
difference of the two estimates (``random``), which measures the estimators'
spread rather than a disagreement. ``dattri_cg``: dattri starts CG from
``v``, curvext from ``0``; CG from ``v`` is ``v`` plus CG from ``0`` on
``v - A v``, so the column compares dattri's result with
``v + curvext_cg(v - A v)`` (computed untimed). ``dattri_arnoldi``: the same
seed gives both the same start vector, yet the results differ by about
``2e-1`` in float32 (``5e-3`` in float64, same setting): the 10 Ritz
vectors of a 30-step Krylov space of this Hessian are far from converged and
move with rounding, and dattri orthogonalises once (curvext: the three-term step plus one
full Gram-Schmidt pass, repeated where the DGKS criterion asks) and keeps
only the tridiagonal part of its projection. Where the Ritz pairs converge
(``tests/test_functional_dattri.py``, float64) the two agree to ``1e-8``.

**Bound** (product and trace rows): a forward and a backward pass of the
model over the 10 batches, with one random cotangent per sample, or 16 at once
for the 16-vector rows (``BoundCell``), timed in the same interleaved repeats.
A GGN product ``Jᵀ H J v`` and a Hessian product both need at least that (the
``Jᵀ`` product is a backward pass); the column ``bound / peer`` is therefore
the best ratio any implementation could reach on this machine.

**Target** (issue 6): time ratio curvext / peer <= 0.67 and no more peak
memory than the peer (column ``target``: ``meets`` only if both hold).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Dict

import curvlinops
import torch
from dattri.func import hessian as dattri
from engine_vs_backpack import MODEL_DESCRIPTIONS, NUM_CLASSES, build_model  # noqa: E402
from harness import (  # noqa: E402
    add_common_arguments,
    cpu_jiffies,
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
from torch.func import functional_call

import curvext.functional as cxf
from curvext.linalg import hutchinson_trace, lanczos_spectrum
from curvext.linalg.eigen import lanczos, tridiagonal_eigh
from curvext.operators import GGNOperator, HessianOperator

BATCH = 128
NUM_BATCHES = 10
NUM_VECTORS = 16
TRACE_MATVECS = 16
NCV, NUM_REPEATS, NUM_POINTS = 8, 2, 1024
IHVP_VECTORS = 4
CG_ITERATIONS, IHVP_REGULARIZATION = 10, 1.0
ARNOLDI_ITERATIONS, ARNOLDI_TOP_K = 30, 10
TARGET_RATIO = 0.67
SINGLE_PROBE_SECONDS = 2.0
# curvext's CG warns when it stops at max_iter before tol: intended here
warnings.filterwarnings("ignore", message=".*CG.*", category=RuntimeWarning)
# torch.jit deprecation (imported by dattri/curvlinops), dattri's 1-D v.T
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="The use of `x.T`")

ROWS = {
    "ggn_1": "GGN @ v [P]",
    "ggn_16": f"GGN @ V [P, {NUM_VECTORS}]",
    "hess_1": "Hessian @ v [P]",
    "hess_16": f"Hessian @ V [P, {NUM_VECTORS}]",
    "trace": f"hutchinson_trace(GGN, {TRACE_MATVECS})",
    "spectrum": f"Lanczos spectrum of GGN (ncv={NCV}, repeats={NUM_REPEATS})",
    "dattri_cg": f"ihvp_at_x_cg (max_iter={CG_ITERATIONS}, [{IHVP_VECTORS}, P])",
    "dattri_arnoldi": (
        f"ihvp_at_x_arnoldi (max_iter={ARNOLDI_ITERATIONS}, "
        f"top_k={ARNOLDI_TOP_K}, [{IHVP_VECTORS}, P])"
    ),
    "dist_ggn_16": f"GGN @ V [P, {NUM_VECTORS}], 2 gloo processes vs 1",
}
PEERS = {
    "ggn_1": "curvlinops",
    "ggn_16": "curvlinops",
    "hess_1": "curvlinops",
    "hess_16": "curvlinops",
    "trace": "curvlinops",
    "spectrum": "curvlinops",
    "dattri_cg": "dattri",
    "dattri_arnoldi": "dattri",
    "dist_ggn_16": "1 process",
}
MLP_ONLY = ("dattri_cg", "dattri_arnoldi", "dist_ggn_16")
WORLD_SIZE = 2


# --------------------------------------------------------------------------
# shared setup: the same model, data and vectors in every cell
# --------------------------------------------------------------------------
def make_batches(device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_BATCHES):
        inputs = torch.randn(BATCH, 1, 28, 28, generator=generator)
        targets = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
        batches.append((inputs.to(device), targets.to(device)))
    return batches


def make_model(name: str, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name).to(device).eval()


def flat_loss(model: nn.Module):
    """``func(θ, X, targets)``: the mean cross-entropy with ``model``'s parameters ``θ [P]``."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def func(theta, inputs, targets):
        params = {
            name: chunk.reshape(shape)
            for name, chunk, shape in zip(names, theta.split(sizes), shapes)
        }
        return nn.functional.cross_entropy(functional_call(model, params, (inputs,)), targets)

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return func, theta


def _random(shape, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device)


class Cell:
    """One library's contender for one (row, model): ``unit()`` returns its result."""

    def __init__(self, row: str, model_name: str, kind: str, device, seed: int, boundaries=None):
        self.row, self.kind, self.device, self.seed = row, kind, device, seed
        model = make_model(model_name, device, seed)
        self.model = model
        params = list(model.parameters())
        dim = sum(p.numel() for p in params)
        loss_fn = nn.CrossEntropyLoss()
        if row.startswith("dattri"):
            self.func, theta = flat_loss(model)
            inputs, labels = make_batches(device, seed)[0]
            targets = nn.functional.one_hot(labels, NUM_CLASSES).to(theta.dtype)
            self.x = (theta, inputs, targets)
            self.vectors = _random((IHVP_VECTORS, dim), seed + 1, device)
            return
        data = make_batches(device, seed)
        hessian = row.startswith("hess")
        if kind == "curvext":
            cls = HessianOperator if hessian else GGNOperator
            self.operator = cls(model, loss_fn, params, data, check_deterministic=False)
        else:
            cls = curvlinops.HessianLinearOperator if hessian else curvlinops.GGNLinearOperator
            self.operator = cls(model, loss_fn, params, data, check_deterministic=False)
        columns = NUM_VECTORS if row.endswith("_16") else 1
        vectors = _random((dim, columns), seed + 1, device)
        self.vectors = vectors if columns > 1 else vectors[:, 0]
        self.boundaries = boundaries

    def unit(self):
        row, kind = self.row, self.kind
        if row in ("ggn_1", "ggn_16", "hess_1", "hess_16"):
            return self.operator @ self.vectors
        if row == "trace":
            return (
                hutchinson_trace(self.operator, TRACE_MATVECS)
                if kind == "curvext"
                else curvlinops.hutchinson_trace(self.operator, TRACE_MATVECS)
            )
        if row == "spectrum":
            if kind == "curvext":
                return lanczos_spectrum(
                    self.operator, NCV, NUM_REPEATS, NUM_POINTS, boundaries=self.boundaries
                )
            return curvlinops.lanczos_approximate_spectrum(
                self.operator, NCV, NUM_POINTS, NUM_REPEATS, boundaries=self.boundaries
            )
        if row == "dattri_cg":
            if kind == "curvext":
                ihvp = cxf.ihvp_at_x_cg(
                    self.func,
                    *self.x,
                    max_iter=CG_ITERATIONS,
                    tol=1e-30,
                    regularization=IHVP_REGULARIZATION,
                )
            else:
                ihvp = dattri.ihvp_at_x_cg(
                    self.func, *self.x, max_iter=CG_ITERATIONS, regularization=IHVP_REGULARIZATION
                )
            return ihvp(self.vectors)
        if row == "dattri_arnoldi":
            torch.manual_seed(self.seed + 2)  # the same start vector for both
            library = cxf if kind == "curvext" else dattri
            ihvp = library.ihvp_at_x_arnoldi(
                self.func,
                *self.x,
                max_iter=ARNOLDI_ITERATIONS,
                top_k=ARNOLDI_TOP_K,
                mode="rev-fwd",
                regularization=IHVP_REGULARIZATION,
            )
            return ihvp(self.vectors)
        raise ValueError(f"unknown row {row!r}; use one of {sorted(ROWS)}")


class BoundCell:
    """A lower bound on the time of any GGN or Hessian product over the data,
    not a contender: a forward pass and a backward pass (vector-Jacobian
    product with the network's Jacobian) per batch, which ``Jᵀ (H J v)`` and
    ``H v`` both need besides their other work. With 16 vectors the backward
    pass takes 16 random cotangents at once (``is_grads_batched``). If this
    costs more than 0.67× the peer's product, no implementation of the
    product meets the target on this machine."""

    def __init__(self, row: str, model_name: str, device, seed: int):
        self.model = make_model(model_name, device, seed)
        self.params = list(self.model.parameters())
        self.batches = make_batches(device, seed)
        self.columns = 1 if row.endswith("_1") else NUM_VECTORS
        self.cotangents = [
            _random((self.columns, BATCH, NUM_CLASSES), seed + 3 + i, device)
            for i in range(len(self.batches))
        ]

    def unit(self):
        grads = None
        for (inputs, _), cotangents in zip(self.batches, self.cotangents):
            outputs = self.model(inputs)
            if self.columns == 1:
                grads = torch.autograd.grad(outputs, self.params, cotangents[0])
            else:
                grads = torch.autograd.grad(outputs, self.params, cotangents, is_grads_batched=True)
        return grads


BOUND_ROWS = ("ggn_1", "ggn_16", "hess_1", "hess_16", "trace")


def spectral_boundaries(model_name: str, device, seed: int):
    """``(0, λ_max)`` of the GGN, λ_max from 10 Lanczos steps (untimed).

    The GGN is positive semi-definite with rank at most ``N (C - 1) < P``
    (``mlp``: ``1280 · 9 < 235,146``; ``cnn``: ``< 12,810``), so λ_min = 0.
    """
    model = make_model(model_name, device, seed)
    G = GGNOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        make_batches(device, seed),
        check_deterministic=False,
    )
    alphas, betas, _ = lanczos(G, _random((G.shape[0],), seed + 3, device), 10)
    ritz_values, _ = tridiagonal_eigh(alphas.double(), betas.double())
    return 0.0, float(ritz_values.max())


# --------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------
def agreement(row: str, cells: Dict[str, Cell], results: Dict[str, object]) -> str:
    ours, theirs = results["curvext"], results["peer"]
    if row == "trace":
        return f"random {rel_diff(ours, theirs):.0e}"
    if row == "spectrum":
        (grid, density), (_, peer_density) = ours, theirs
        l1 = torch.trapezoid((density - peer_density).abs().double(), grid.double())
        return f"random {float(l1 / torch.trapezoid(peer_density.double(), grid.double())):.0e}"
    if row == "dattri_cg":
        cell = cells["curvext"]
        product = cxf.hvp_at_x(cell.func, cell.x, regularization=IHVP_REGULARIZATION)
        residuals = cell.vectors - torch.vmap(product)(cell.vectors)
        shifted = cxf.ihvp_at_x_cg(
            cell.func,
            *cell.x,
            max_iter=CG_ITERATIONS,
            tol=1e-30,
            regularization=IHVP_REGULARIZATION,
        )(residuals)
        return f"{rel_diff(cell.vectors + shifted, theirs):.0e}"
    return f"{rel_diff(ours, theirs):.0e}"


# --------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------
def make_cell(spec: dict, device) -> Cell:
    """The cell of ``--memory-probe``."""
    return Cell(
        spec["row"], spec["model"], spec["kind"], device, spec["seed"], spec.get("boundaries")
    )


def measure(row: str, model_name: str, device, args) -> dict:
    boundaries = spectral_boundaries(model_name, device, args.seed) if row == "spectrum" else None
    cells = {
        kind: Cell(row, model_name, kind, device, args.seed, boundaries)
        for kind in ("curvext", "peer")
    }
    if row in BOUND_ROWS:
        cells["bound"] = BoundCell(row, model_name, device, args.seed)
    (times, results), foreign = measure_quietly(
        functools.partial(time_cells, cells, device, args), args
    )
    ms = {kind: statistics.median(values) for kind, values in times.items()}
    result = {
        "row": row,
        "model": model_name,
        "times_ms": times,
        "ms": ms,
        "foreign_load": foreign,
        "agreement": agreement(row, cells, results),
        "boundaries": boundaries,
        "mem": {},
    }
    del results
    for kind, cell in cells.items():
        if kind == "bound":
            continue
        runs = 1 if ms[kind] > 1e3 * SINGLE_PROBE_SECONDS else 3
        spec = {
            "row": row,
            "model": model_name,
            "kind": kind,
            "seed": args.seed,
            "boundaries": boundaries,
        }
        result["mem"][kind] = (
            None if args.no_memory else peak_memory(__file__, spec, cell, device, runs)
        )
    del cells
    gc.collect()
    return result


# --------------------------------------------------------------------------
# data parallel: 2 gloo processes against 1 (torch.distributed)
# --------------------------------------------------------------------------
DIST_CONTENDERS = ("2x1", "1x1", "1x2")  # processes x torch threads each


def _dist_worker(rank: int, init_file: str, out_file: str, spec: dict) -> None:
    """One rank: time the sharded product against one process over all batches.

    Every repeat runs the three contenders in turn (order rotating), each
    between two barriers: ``2x1``, both ranks on their 5 batches with one
    thread each, the product all-reduced; ``1x1`` and ``1x2``, rank 0 alone
    over all 10 batches (``distributed=False``) with 1 and 2 threads while
    rank 1 waits in the barrier (a blocking wait, no CPU).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=900),
    )
    try:
        cpu = torch.device("cpu")
        model = make_model(spec["model"], cpu, spec["seed"])
        params, loss_fn = list(model.parameters()), nn.CrossEntropyLoss()
        batches = make_batches(cpu, spec["seed"])
        sharded = GGNOperator(
            model, loss_fn, params, batches[rank::WORLD_SIZE], check_deterministic=False
        )  # reduces over the group
        whole = GGNOperator(
            model, loss_fn, params, batches, check_deterministic=False, distributed=False
        )
        vectors = _random((sharded.shape[0], NUM_VECTORS), spec["seed"] + 1, cpu)
        results = {}

        def run(name):
            dist.barrier()
            start = time.perf_counter()
            if name == "2x1":
                results[name] = sharded @ vectors
            elif rank == 0:
                torch.set_num_threads(2 if name == "1x2" else 1)
                results[name] = whole @ vectors
                torch.set_num_threads(1)
            elapsed = time.perf_counter() - start
            dist.barrier()
            return elapsed

        for _ in range(spec["warmup"]):
            for name in DIST_CONTENDERS:
                run(name)
        jiffies = cpu_jiffies()
        clock = time.perf_counter()
        times = {name: [] for name in DIST_CONTENDERS}
        for repeat in range(spec["repeats"]):
            shift = repeat % len(DIST_CONTENDERS)
            for name in DIST_CONTENDERS[shift:] + DIST_CONTENDERS[:shift]:
                times[name].append(1e3 * run(name))
        seconds = time.perf_counter() - clock
        end = cpu_jiffies()
        # this rank's own CPU time, summed over the ranks, is not "other load"
        own = torch.tensor([float(end[1] - jiffies[1]) if end and jiffies else 0.0])
        dist.all_reduce(own)
        if rank == 0:
            foreign = None
            if end and jiffies:
                ticks = os.sysconf("SC_CLK_TCK")
                busy = (end[0] - jiffies[0]) - own.item()
                foreign = max(0.0, busy / ticks / (seconds * os.cpu_count()))
            with open(out_file, "w") as out:
                json.dump(
                    {
                        "times_ms": times,
                        "foreign_load": foreign,
                        "agreement": f"{rel_diff(results['2x1'], results['1x1']):.0e}",
                    },
                    out,
                )
    finally:
        dist.destroy_process_group()


def measure_distributed(model_name: str, args) -> dict:
    """The ``dist_ggn_16`` row: ``torch.multiprocessing.spawn`` of 2 gloo ranks."""
    import torch.multiprocessing as mp

    spec = {
        "model": model_name,
        "seed": args.seed,
        "warmup": args.warmup,
        "repeats": max(args.repeats, 3),
    }
    with tempfile.TemporaryDirectory() as folder:
        out_file = os.path.join(folder, "result.json")
        mp.spawn(
            _dist_worker,
            args=(os.path.join(folder, "init"), out_file, spec),
            nprocs=WORLD_SIZE,
            join=True,
        )
        with open(out_file) as result_file:
            result = json.load(result_file)
    result["ms"] = {name: statistics.median(values) for name, values in result["times_ms"].items()}
    result.update(row="dist_ggn_16", model=model_name)
    return result


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def render(rows, args, device, machine, source, load_start, started, elapsed) -> str:
    memory = memory_method(device, args.no_memory)
    lines = [
        f"# Matrix-free curvature: curvext vs curvlinops and dattri ({device.type})",
        "",
        f"Machine: {machine}",
        "",
        f"Source: {source}.",
        "",
        f"Load average (1, 5, 15 min) at start: {load_start}; at end: {load_average()} "
        "(other processes on the machine distort timings).",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, float32, CrossEntropyLoss: "
        f"median of {args.repeats} interleaved repeats (fewer, at least 1, once a row's "
        f"timed runs took {args.max_time:g} s) after {args.warmup} warm-up run(s) each "
        + (
            f"(more, up to {args.max_repeats}, while a row's timed runs took less than "
            f"{args.min_time:g} s) "
            if args.min_time > 0
            else ""
        )
        + f"(column `n`). Operators: {NUM_BATCHES} batches of {BATCH}, built (with "
        "`check_deterministic=False`) before timing. Peak MB = extra memory of one unit "
        f"over what is allocated before it ({memory}). Target: ratio <= {TARGET_RATIO} "
        "and no more peak memory than the peer. "
        "See the script's docstring for each row's exact calls.",
        "",
        "Models: "
        + "; ".join(f"`{name}` = {MODEL_DESCRIPTIONS[name]}" for name in args.models)
        + ".",
        "",
        "| model | row | peer | curvext ms | peer ms | ratio (curvext/peer) | curvext peak MB "
        "| peer peak MB | target | n | other load | rel. diff | bound ms | bound / peer |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- "
        "| ---: | ---: |",
    ]
    for row in rows:
        if row["row"] == "dist_ggn_16":
            continue
        ms, mem = row["ms"], row["mem"]
        ratio = ms["curvext"] / ms["peer"]
        memory_ok = mem["curvext"] is None or mem["peer"] is None or mem["curvext"] <= mem["peer"]
        mark = "meets" if ratio <= TARGET_RATIO and memory_ok else "**misses**"
        lines.append(
            f"| {row['model']} | {ROWS[row['row']]} | {PEERS[row['row']]} "
            f"| {ms['curvext']:.1f} | {ms['peer']:.1f} | {ratio:.2f} | {mb(mem['curvext'])} "
            f"| {mb(mem['peer'])} | {mark} | {len(row['times_ms']['curvext'])} "
            f"| {pct(row['foreign_load'])} | {row['agreement']} "
            + (
                f"| {ms['bound']:.1f} | {ms['bound'] / ms['peer']:.2f} |"
                if "bound" in ms
                else "| | |"
            )
        )
    lines += [
        "",
        "Ratio < 1 means curvext is faster. `rel. diff`: ||curvext − peer|| / ||peer|| of "
        "the results; `random`: the two libraries draw different probes, so the number "
        "is the spread of the estimator (trace: of the two estimates; spectrum: L1 "
        "distance of the two densities over the peer's mass), not a disagreement. "
        "`dattri_cg`: dattri starts CG from v, so its result is compared with "
        "v + curvext_cg(v − A v). `dattri_arnoldi`: the same start vector, but the 10 "
        "Ritz vectors of 30 steps are not converged and move with rounding and with "
        "the two orthogonalisations (5e-3 apart in float64; see the script's "
        "docstring). `other load`: share of all CPUs other processes used "
        "while the row was timed (a high value means the row is unreliable). "
        "`bound`: a forward and a backward pass per batch (16 cotangents at once for "
        "the 16-vector rows), timed in the same repeats: every GGN or Hessian product "
        "needs at least that, so `bound / peer` above the target means no "
        "implementation meets it here (`BoundCell`).",
    ]
    parallel = [row for row in rows if row["row"] == "dist_ggn_16"]
    if parallel:
        lines += [
            "",
            "## Data parallel: 2 processes vs 1 (`torch.distributed`, gloo)",
            "",
            f"`GGNOperator @ V [P, {NUM_VECTORS}]` over the same {NUM_BATCHES} batches: "
            f"`2x1` = 2 processes with 1 torch thread each, each over its "
            f"{NUM_BATCHES // WORLD_SIZE} batches (`batches[rank::2]`), the product "
            "all-reduced (curvext.distributed); `1x1` = 1 process with 1 thread over all "
            "batches (the speed-up the issue asks for); `1x2` = 1 process with 2 threads, "
            "the same 2 cores as `2x1` (the fair comparison on a 2-core machine). The "
            "contenders alternate within one spawn; each timed product sits between "
            "two barriers, so `2x1` includes the all-reduce and waiting for the slower "
            "rank. Peak memory is not measured for this row.",
            "",
            "| model | product | 2x1 ms | 1x1 ms | 1x2 ms | speed-up 1x1 / 2x1 "
            "| speed-up 1x2 / 2x1 | n | other load | rel. diff 2x1 vs 1x1 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in parallel:
            ms = row["ms"]
            lines.append(
                f"| {row['model']} | GGN @ V [P, {NUM_VECTORS}] | {ms['2x1']:.1f} "
                f"| {ms['1x1']:.1f} | {ms['1x2']:.1f} | {ms['1x1'] / ms['2x1']:.2f} "
                f"| {ms['1x2'] / ms['2x1']:.2f} | {len(row['times_ms']['2x1'])} "
                f"| {pct(row['foreign_load'])} | {row['agreement']} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=3, max_repeats=9)
    parser.add_argument(
        "--max-time",
        type=float,
        default=15.0,
        help="stop repeating a row (after at least one repeat) once its "
        "timed runs took this many seconds: the CNN's estimator rows "
        "cost tens of seconds per unit on 2 cores",
    )
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated row keys: " + ",".join(ROWS)
    )
    args = finish_common_arguments(parser.parse_args(argv), "matrix_free", quick_repeats=1)
    if args.quick:
        args.busy_retries = 0
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; use some of {','.join(ROWS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe is not None:
        return run_memory_probe(args.memory_probe, make_cell)
    device = device_for(args)
    started, clock = datetime.datetime.utcnow(), time.perf_counter()
    machine = machine_line(device, ("curvlinops-for-pytorch", "dattri"))
    source, load_start = source_line(), load_average()
    print(machine, source, f"load average: {load_start}", sep="\n", flush=True)

    rows = []
    for model_name in args.models:
        for row in args.rows:
            if row in MLP_ONLY and model_name != "mlp":
                continue
            if row == "dist_ggn_16":
                if device.type != "cpu":
                    print("dist_ggn_16: CPU (gloo) only; skipped", flush=True)
                    continue
                result = measure_distributed(model_name, args)
                rows.append(result)
                ms = result["ms"]
                print(
                    f"{model_name:4s} {ROWS[row]:50s} 2x1 {ms['2x1']:9.1f} ms  1x1 "
                    f"{ms['1x1']:9.1f} ms  1x2 {ms['1x2']:9.1f} ms  speed-up "
                    f"{ms['1x1'] / ms['2x1']:.2f} / {ms['1x2'] / ms['2x1']:.2f}  diff "
                    f"{result['agreement']}  other load {pct(result['foreign_load'])}",
                    flush=True,
                )
                continue
            result = measure(row, model_name, device, args)
            rows.append(result)
            ms, mem = result["ms"], result["mem"]
            print(
                f"{model_name:4s} {ROWS[row]:50s} x{len(result['times_ms']['curvext']):<2d} "
                f"curvext {ms['curvext']:9.1f} ms  {PEERS[row]} {ms['peer']:9.1f} ms  "
                f"ratio {ms['curvext'] / ms['peer']:.2f}  mem {mb(mem['curvext'])} / "
                f"{mb(mem['peer'])} MB  diff {result['agreement']}  other load "
                f"{pct(result['foreign_load'])}",
                flush=True,
            )

    report = render(
        rows, args, device, machine, source, load_start, started, time.perf_counter() - clock
    )
    raw = {
        "machine": machine,
        "source": source,
        "args": {k: v for k, v in vars(args).items()},
        "rows": [{**r, "label": ROWS[r["row"]], "peer": PEERS[r["row"]]} for r in rows],
    }
    write_report(report, raw, args.out)


if __name__ == "__main__":
    main()
