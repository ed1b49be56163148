"""Time and measure curvext's curvature operators against curvlinops and laplace-torch.

Run from the repository root::

    python benchmarks/operators_vs_peers.py                       # CPU, ~6 min on 2 cores
    python benchmarks/operators_vs_peers.py --device cuda         # GPU
    python benchmarks/operators_vs_peers.py --quick --no-memory   # smoke run
    python benchmarks/operators_vs_peers.py --quick --rows kfac_t2 --models mlp

Needs ``curvlinops-for-pytorch`` (3.0.1), ``laplace-torch`` (0.3) and
``backpack-for-pytorch``. Conventions are those of ``engine_vs_backpack.py``,
whose models, helpers and report lines this script imports: the contenders
live in one process, on deep copies of the same model, with the same data;
after warm-up runs every repeat runs each contender once, the order rotating;
the table reports medians. Peak memory is the extra memory of one unit over
what is allocated before it: ``torch.cuda.max_memory_allocated`` on CUDA, on
CPU the peak RSS (``VmHWM`` after a reset through ``/proc/self/clear_refs``)
over the RSS before the unit, in a fresh process per cell (this script
re-invoked with ``--memory-probe``, median of 3 units after one warm-up).

**Rows** (float32, ``CrossEntropyLoss(reduction="mean")``, 10 batches of 128
random MNIST-sized inputs, 10 classes; models ``mlp`` and ``cnn`` of
``engine_vs_backpack.py``):

* ``kfac_t2``, ``kfac_mc``: ``KronOperator.from_data(model, loss_fn, batches,
  fisher_type=...)`` vs curvlinops' ``KFACLinearOperator(model, loss_fn,
  params, batches, fisher_type=..., check_deterministic=False)`` followed by
  ``compute_kronecker_factors()`` -- curvlinops computes the factors lazily,
  on the first product, so the timed unit forces it. Both use
  ``kfac_approx="expand"``, one MC sample per datum (``"mc"``) and separate
  weight and bias blocks (curvlinops' default
  ``separate_weight_and_bias=True``; curvext has no joint ``[W, b]`` block).
  curvlinops' type-2 backpropagates the ``C`` columns of the loss Hessian's
  square root one at a time (``C`` backward passes per batch) after a Python
  loop over the samples; curvext runs one batched backward.
* ``ekfac_t2``: ``EKFACOperator.from_data`` vs ``EKFACLinearOperator`` with
  ``compute_kronecker_factors()`` + ``compute_eigenvalue_correction()``
  (two passes over the data each).
* ``laplace_kron``, ``laplace_diag``: ``Laplace(model, "classification",
  subset_of_weights="all", hessian_structure=...).fit(loader)`` with
  ``backend=CurvextGGN`` (``curvext.integrations.laplace``) vs laplace-torch's
  ``BackPackGGN``; the loader serves the same 10 batches of 128
  (``DataLoader`` over a ``TensorDataset``, no shuffling). The ``Laplace``
  object is built (and the model extended) before timing; the unit is
  ``fit``.
* ``inv_*``: the inverse of a ~1M-parameter KFAC, ``mlp1m`` = Flatten,
  Linear(784, 1000), ReLU, Linear(1000, 200), ReLU, Linear(200, 10) (987,210
  parameters). Its factors come from one type-2 KFAC backward over one batch
  of 128 (curvlinops'; the curvext ``KronOperator`` is built from the same
  tensors, so both invert identical factors). Peer: curvlinops'
  ``KFACInverseLinearOperator`` -- dense-free like curvext's: it inverts the
  factors, never the ``P × P`` matrix. Three dampings (``δ = 1e-3``):
  factor-wise ``(G + δ)⁻¹ ⊗ (A + δ)⁻¹`` (``plain``), π-damping
  (``use_heuristic_damping``) and ``(G ⊗ A + δ)⁻¹`` via eigendecompositions
  (``use_exact_damping``). ``*_setup`` rows time what a user pays for the
  first product (``K.inverse(...) @ v`` vs ``KFACInverseLinearOperator(...)
  @ v``; curvlinops inverts lazily, on the first product, and caches),
  ``*_product`` rows one more product with the inverse already formed.

**Agreement** (last column): the relative difference
``||K_curvext V - K_peer V|| / ||K_peer V||`` for a fixed random ``V [P, 4]``
(KFAC, EKFAC; independent of how either library stores its factors), of
``K⁻¹ v`` (inverse rows), and for laplace the largest of the relative
differences of the posterior's ``H`` (per Kronecker block, from the
normalised factors and their norms, or the diagonal) and of
``log_marginal_likelihood()``. MC rows draw different samples and are not
compared. Target (from the issue): ratio curvext/peer <= 0.67 and no more
peak memory than the peer (``target`` column: ``meets`` only if both hold)
for ``from_data`` and ``Laplace.fit``; the inverse rows are reported against
curvlinops' dense-free inverse without a target (``(no target)``), as the
issue asks.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import curvlinops  # noqa: E402
import torch
from engine_vs_backpack import (  # noqa: E402
    MODEL_DESCRIPTIONS,
    NUM_CLASSES,
    _kron_rel,
    build_model,
)
from harness import (  # noqa: E402
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
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN  # noqa: E402
from torch import nn

from curvext.integrations.laplace import CurvextGGN  # noqa: E402
from curvext.operators import EKFACOperator, KronOperator  # noqa: E402

BATCH = 128
NUM_BATCHES = 10
DAMPING = 1e-3
TARGET_RATIO = 0.67
warnings.filterwarnings("ignore", message="Full backward hook is firing")

BIG_MODEL = "mlp1m"
DESCRIPTIONS = {
    **MODEL_DESCRIPTIONS,
    BIG_MODEL: "Flatten, Linear(784,1000), ReLU, Linear(1000,200), ReLU, Linear(200,10)",
}


def build(name: str) -> nn.Module:
    if name == BIG_MODEL:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 1000),
            nn.ReLU(),
            nn.Linear(1000, 200),
            nn.ReLU(),
            nn.Linear(200, NUM_CLASSES),
        )
    return build_model(name)


def make_batches(device: torch.device, seed: int, num_batches: int = NUM_BATCHES):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_batches * BATCH, 1, 28, 28, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (num_batches * BATCH,), generator=generator)
    return list(zip(inputs.to(device).split(BATCH), targets.to(device).split(BATCH)))


# --------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    label: str
    family: str  # "kron", "ekfac", "laplace" or "inverse"
    peer: str  # the other contender's name in the table
    options: dict = field(default_factory=dict)


INVERSE_VARIANTS = {
    "plain": {},
    "heuristic": {"use_heuristic_damping": True},
    "exact": {"use_exact_damping": True},
}

ROWS: List[Row] = [
    Row(
        "kfac_t2",
        'KronOperator.from_data vs KFACLinearOperator, "type-2"',
        "kron",
        "curvlinops",
        {"fisher_type": "type-2"},
    ),
    Row(
        "kfac_mc",
        'KronOperator.from_data vs KFACLinearOperator, "mc"',
        "kron",
        "curvlinops",
        {"fisher_type": "mc"},
    ),
    Row(
        "ekfac_t2",
        'EKFACOperator.from_data vs EKFACLinearOperator, "type-2"',
        "ekfac",
        "curvlinops",
        {"fisher_type": "type-2"},
    ),
    Row(
        "laplace_kron",
        "Laplace(kron).fit: CurvextGGN vs BackPackGGN",
        "laplace",
        "BackPACK",
        {"structure": "kron"},
    ),
    Row(
        "laplace_diag",
        "Laplace(diag).fit: CurvextGGN vs BackPackGGN",
        "laplace",
        "BackPACK",
        {"structure": "diag"},
    ),
    *[
        Row(
            f"inv_{variant}_{stage}",
            f"inverse({DAMPING:g}{', ' + next(iter(flags)) if flags else ''}) "
            + ("setup + K⁻¹v" if stage == "setup" else "K⁻¹v (inverse cached)"),
            "inverse",
            "curvlinops",
            {"variant": variant, "cached": stage == "product"},
        )
        for variant, flags in INVERSE_VARIANTS.items()
        for stage in ("setup", "product")
    ],
]
ROWS_BY_KEY = {row.key: row for row in ROWS}


def row_models(row: Row, models: List[str]) -> List[str]:
    return [BIG_MODEL] if row.family == "inverse" else models


# --------------------------------------------------------------------------
# cells: unit() is timed; clear() runs untimed before it; agree() afterwards
# --------------------------------------------------------------------------
def _probe_matrix(size: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 4, generator=generator).to(device)


class FromDataCell:
    """``KronOperator``/``EKFACOperator.from_data`` or curvlinops' counterpart."""

    def __init__(self, kind: str, row: Row, base: nn.Module, device):
        self.kind, self.row = kind, row
        self.model = copy.deepcopy(base).to(device)
        self.loss_fn = nn.CrossEntropyLoss().to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = make_batches(device, seed=0)
        self.fisher_type = row.options["fisher_type"]
        self.operator = None

    def clear(self):
        self.operator = None

    def unit(self):
        if self.kind == "curvext":
            cls = KronOperator if self.row.family == "kron" else EKFACOperator
            self.operator = cls.from_data(
                self.model, self.loss_fn, self.batches, fisher_type=self.fisher_type
            )
            return
        cls = (
            curvlinops.KFACLinearOperator
            if self.row.family == "kron"
            else curvlinops.EKFACLinearOperator
        )
        operator = cls(
            self.model,
            self.loss_fn,
            self.params,
            self.batches,
            fisher_type=self.fisher_type,
            mc_samples=1,
            kfac_approx="expand",
            separate_weight_and_bias=True,
            check_deterministic=False,
        )
        operator.compute_kronecker_factors()  # lazy otherwise: forced inside the unit
        if self.row.family == "ekfac":
            operator.compute_eigenvalue_correction()
        self.operator = operator

    def output(self):
        """``K V`` for the fixed probe ``V``, to compare the libraries."""
        if self.fisher_type == "mc":
            return None
        size = sum(p.numel() for p in self.params)
        return self.operator @ _probe_matrix(size, self.params[0].device)


class LaplaceCell:
    """``Laplace(...).fit(loader)`` with curvext's or BackPACK's GGN backend."""

    def __init__(self, kind: str, row: Row, base: nn.Module, device):
        self.kind = kind
        backend = CurvextGGN if kind == "curvext" else BackPackGGN
        # blocks of Linear layers: BackPACK's KFLR and curvext's KFAC("expand")
        # differ by design on convolutions (see engine_vs_backpack.agreement)
        self.linear_blocks = [
            isinstance(module, nn.Linear)
            for module in base.modules()
            for p in module.parameters(recurse=False)
        ]
        self.la = Laplace(
            copy.deepcopy(base).to(device),
            "classification",
            subset_of_weights="all",
            hessian_structure=row.options["structure"],
            backend=backend,
        )
        batches = make_batches(device, seed=0)
        dataset = torch.utils.data.TensorDataset(
            torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        )
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)

    def clear(self):
        self.la.H = None

    def unit(self):
        self.la.fit(self.loader)

    def output(self):
        # KronLaplace keeps the summed factors in H_facs and their eigendecomposition in H
        H = getattr(self.la, "H_facs", self.la.H)
        return {
            "H": H,
            "lml": self.la.log_marginal_likelihood().detach(),
            "linear_blocks": self.linear_blocks,
        }


class InverseCell:
    """``K.inverse(...) @ v`` vs ``KFACInverseLinearOperator(...) @ v``, same factors."""

    def __init__(self, kind: str, row: Row, base: nn.Module, device):
        self.kind, self.device = kind, device
        self.flags = INVERSE_VARIANTS[row.options["variant"]]
        self.cached = row.options["cached"]
        model = copy.deepcopy(base).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.kfac = curvlinops.KFACLinearOperator(
            model,
            nn.CrossEntropyLoss().to(device),
            params,
            make_batches(device, seed=0, num_batches=1),
            fisher_type="type-2",
            check_deterministic=False,
        )
        self.kfac.compute_kronecker_factors()
        factors = {}  # position of the parameter -> its factors
        for name, positions in self.kfac._mapping.items():
            G = self.kfac._gradient_covariances[name]
            for kind_of, position in positions.items():
                factors[position] = (
                    [G, self.kfac._input_covariances[name]] if kind_of == "weight" else [G]
                )
        self.K = KronOperator(params, [factors[i] for i in range(len(params))])
        generator = torch.Generator().manual_seed(2)
        self.vector = torch.randn(self.K.shape[0], generator=generator).to(device)
        self.inverse = self._setup() if self.cached else None
        if self.cached:
            self.inverse @ self.vector  # curvlinops inverts on the first product
        self.result = None

    def _setup(self):
        if self.kind == "curvext":
            return self.K.inverse(damping=DAMPING, **self.flags)
        return curvlinops.KFACInverseLinearOperator(self.kfac, damping=DAMPING, **self.flags)

    def clear(self):
        self.result = None

    def unit(self):
        inverse = self.inverse if self.cached else self._setup()
        self.result = inverse @ self.vector

    def output(self):
        if "use_heuristic_damping" not in self.flags:
            return self.result
        # curvlinops damps a bias with its weight's π-damped G; curvext gives every
        # one-factor block plain damping: compare the weight entries only
        weights = torch.cat(
            [torch.full((p.numel(),), p.ndim > 1, device=self.device) for p in self.K.params]
        )
        return self.result[weights]


FAMILY_CELLS = {
    "kron": FromDataCell,
    "ekfac": FromDataCell,
    "laplace": LaplaceCell,
    "inverse": InverseCell,
}


def make_cell(spec: dict, device):
    row = ROWS_BY_KEY[spec["row"]]
    torch.manual_seed(spec["seed"])
    base = build(spec["model"])
    torch.manual_seed(spec["seed"])  # MC draws: the same stream in every process
    return FAMILY_CELLS[row.family](spec["kind"], row, base, device)


def agreement(row: Row, outputs: Dict[str, object]) -> str:
    ours, theirs = outputs["curvext"], outputs[row.peer]
    if row.family in ("kron", "ekfac") and row.options["fisher_type"] == "mc":
        return "MC"
    if row.family == "inverse" and row.options["variant"] == "heuristic":
        return f"{rel_diff(ours, theirs):.0e} (weights; biases: see notes)"
    if row.family != "laplace":
        return f"{rel_diff(ours, theirs):.0e}"
    lml = abs(float(ours["lml"]) - float(theirs["lml"])) / abs(float(theirs["lml"]))
    if row.options["structure"] == "diag":
        return f"H {rel_diff(ours['H'], theirs['H']):.0e}, lml {lml:.0e}"
    pairs = zip(ours["H"].kfacs, theirs["H"].kfacs, ours["linear_blocks"])
    H = max(_kron_rel(a, b) for a, b, linear in pairs if linear)
    if all(ours["linear_blocks"]):
        return f"H {H:.0e}, lml {lml:.0e}"
    return f"H {H:.0e} (Linear blocks), lml {lml:.0e} (convolutions: see notes)"


# --------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------
def measure(row: Row, model: str, device, args) -> dict:
    """Time curvext and the peer on one (row, model), then their memory one by one."""
    specs = {
        kind: {"row": row.key, "model": model, "kind": kind, "seed": args.seed}
        for kind in ("curvext", row.peer)
    }
    cells = {kind: make_cell(spec, device) for kind, spec in specs.items()}
    (times, _), foreign = measure_quietly(functools.partial(time_cells, cells, device, args), args)
    ms = {kind: statistics.median(values) for kind, values in times.items()}
    result = {
        "row": row.key,
        "label": row.label,
        "peer": row.peer,
        "model": model,
        "times_ms": times,
        "foreign_load": foreign,
        "ms": ms,
        "agreement": agreement(row, {k: c.output() for k, c in cells.items()}),
        "mem": {},
    }
    for kind, spec in specs.items():
        result["mem"][kind] = (
            None if args.no_memory else peak_memory(__file__, spec, cells[kind], device)
        )
    del cells
    gc.collect()
    return result


def verdict(result: dict) -> str:
    """``meets``/``**misses**`` the issue's target; the inverse rows have none
    (issue 5 asks for their time against a dense-free baseline only)."""
    if ROWS_BY_KEY[result["row"]].family == "inverse":
        return "(no target)"
    ms, mem = result["ms"], result["mem"]
    ratio = ms["curvext"] / ms[result["peer"]]
    memory_ok = (
        mem["curvext"] is None
        or mem[result["peer"]] is None
        or mem["curvext"] <= mem[result["peer"]]
    )
    return "meets" if ratio <= TARGET_RATIO and memory_ok else "**misses**"


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def render(results, args, device, machine, source, load_start, started, elapsed) -> str:
    memory = memory_method(device, args.no_memory)
    models = sorted({r["model"] for r in results}, key=list(DESCRIPTIONS).index)
    lines = [
        f"# curvext operators vs curvlinops and laplace-torch ({device.type})",
        "",
        f"Machine: {machine}",
        "",
        f"Source: {source}.",
        "",
        f"Load average (1, 5, 15 min) at start: {load_start}; at end: {load_average()} "
        "(other processes on the machine distort timings).",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, float32, CrossEntropyLoss: "
        f"median of at least {args.repeats} interleaved repeats after {args.warmup} "
        "warm-up run(s) each "
        + (
            f"(more, up to {args.max_repeats}, while a row's timed runs took less than "
            f"{args.min_time:g} s) "
            if args.min_time > 0
            else ""
        )
        + f"(column `n`). Data: {NUM_BATCHES} batches of {BATCH} (inverse rows: factors "
        f"from one batch of {BATCH}). Peak MB = extra memory of one unit over what is "
        f"allocated before it ({memory}). Target: ratio <= {TARGET_RATIO} and no more "
        "peak memory than the peer.",
        "",
        "Models: " + "; ".join(f"`{name}` = {DESCRIPTIONS[name]}" for name in models) + ".",
        "",
        "| model | unit | peer | curvext ms | peer ms | ratio (curvext/peer) "
        "| curvext peak MB | peer peak MB | target | n | other load | agreement |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in results:
        ms, mem, peer = r["ms"], r["mem"], r["peer"]
        lines.append(
            f"| {r['model']} | {r['label']} | {peer} | {ms['curvext']:.1f} | {ms[peer]:.1f} "
            f"| {ms['curvext'] / ms[peer]:.2f} | {mb(mem['curvext'])} | {mb(mem[peer])} "
            f"| {verdict(r)} | {len(r['times_ms']['curvext'])} | {pct(r['foreign_load'])} "
            f"| {r['agreement']} |"
        )
    lines += [
        "",
        "Ratio < 1 means curvext is faster. Agreement: relative difference of `K V` for a "
        "fixed random `V [P, 4]` (KFAC, EKFAC), of `K⁻¹ v` (inverse rows), of the "
        "posterior's `H` and of the log marginal likelihood (laplace); MC rows draw "
        "different samples. curvlinops' KFAC/EKFAC factors are lazy: the unit calls "
        "`compute_kronecker_factors()` (and `compute_eigenvalue_correction()`); its "
        "inverse is formed on the first product (`setup` rows). `other load`: share of "
        "all CPUs other processes used while the row was timed (a high value means the "
        "row is unreliable).",
        "",
        "Conventions: both libraries keep weight and bias in separate blocks. With "
        "`use_heuristic_damping`, curvlinops damps a bias's factor `G` with the "
        "π-damped value of its layer's weight (it inverts `G` once per layer), curvext "
        "gives every one-factor block plain damping `δ`; the agreement of those rows "
        "is over the weight entries. On convolutions BackPACK's KFLR (behind "
        "`BackPackGGN.kron`) sums the output-side columns over positions before the "
        "outer product and averages `A` over samples only, while `CurvextGGN` uses "
        "KFAC-expand (as curvlinops): their Kronecker blocks differ by design there, so "
        "`H` is compared on Linear blocks and the log marginal likelihoods differ.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=5)
    parser.add_argument(
        "--models",
        default="mlp,cnn",
        help=f"comma-separated: mlp,cnn (the inverse rows always use {BIG_MODEL})",
    )
    parser.add_argument(
        "--rows",
        default=",".join(r.key for r in ROWS),
        help="comma-separated row keys: " + ",".join(r.key for r in ROWS),
    )
    args = finish_common_arguments(parser.parse_args(argv), "operators")
    args.models = [m for m in args.models.split(",") if m]
    unknown = [k for k in args.rows.split(",") if k and k not in ROWS_BY_KEY]
    if unknown:
        parser.error(f"unknown rows {unknown}; use some of {list(ROWS_BY_KEY)}")
    args.rows = [k for k in args.rows.split(",") if k]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe is not None:
        return run_memory_probe(args.memory_probe, make_cell)
    device = device_for(args)
    started, clock = datetime.datetime.utcnow(), time.perf_counter()
    machine = machine_line(device, ("curvlinops-for-pytorch", "laplace-torch"))
    source, load_start = source_line(), load_average()
    print(machine, source, f"load average: {load_start}", sep="\n", flush=True)

    results = []
    for key in args.rows:
        row = ROWS_BY_KEY[key]
        for model in row_models(row, args.models):
            result = measure(row, model, device, args)
            results.append(result)
            ms, mem = result["ms"], result["mem"]
            print(
                f"{model:5s} {row.key:20s} x{len(result['times_ms']['curvext']):<3d}"
                f"curvext {ms['curvext']:9.1f} ms  {row.peer} {ms[row.peer]:9.1f} ms  "
                f"ratio {ms['curvext'] / ms[row.peer]:.2f}  mem {mb(mem['curvext'])} / "
                f"{mb(mem[row.peer])} MB  {verdict(result)}  agreement "
                f"{result['agreement']}  other load {pct(result['foreign_load'])}",
                flush=True,
            )

    report = render(
        results, args, device, machine, source, load_start, started, time.perf_counter() - clock
    )
    raw = {"machine": machine, "source": source, "args": vars(args), "results": results}
    write_report(report, raw, args.out)


if __name__ == "__main__":
    main()
