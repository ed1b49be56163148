"""Time and measure ``GGNEigen`` against ViViT, and the cost of eigenvalue logging.

Run from the repository root::

    python benchmarks/ggn_eigen_vs_vivit.py                  # CPU, ~4 min on 2 cores
    python benchmarks/ggn_eigen_vs_vivit.py --device cuda    # GPU
    python benchmarks/ggn_eigen_vs_vivit.py --quick --no-memory   # smoke run

Needs ``backpack-for-pytorch`` and ``vivit-for-pytorch``
(``pip install vivit-for-pytorch``). Conventions are those of
``engine_vs_backpack.py`` (whose models, data and helpers this script
imports): both contenders in one process on deep copies of the same model and
data, warm-up runs, then repeats that run every contender once with the order
rotating, medians; peak memory per cell in a fresh process on CPU (peak RSS
over RSS before the unit), ``torch.cuda.max_memory_allocated`` on CUDA.

**Part 1, GGNEigen vs ViViT** (batch 128, MLP and CNN, ``CrossEntropyLoss``):
the unit is forward + loss + backward with the extension active.

* eigenvalues only: ``GGNEigen(eigenvectors=False)`` (all nonzero
  eigenvalues) vs ViViT's ``EigvalshComputation`` (all Gram eigenvalues);
* with eigenvectors: ``GGNEigen(top_k=5)`` vs ViViT's ``EighComputation``
  with ``criterion`` = the 5 largest;

each for the exact GGN (``mc_samples=0``; Gram matrix ``N·(C−1) = 1152``
wide for curvext, ``N·C = 1280`` for ViViT, which pushes one column more per
sample) and its MC estimate (``mc_samples=1``, ``128`` wide).

**ViViT patch.** ViViT 1.0.0 calls ``Tensor.symeig``, which PyTorch 2.x
keeps only as a stub that raises. Before importing ViViT this script replaces
it, as PyTorch's deprecation message prescribes, with
``torch.linalg.eigh(self, UPLO="U" if upper else "L")`` for
``eigenvectors=True`` and ``torch.linalg.eigvalsh`` (plus an empty tensor for
the eigenvectors, as ``symeig`` returned) for ``eigenvectors=False``; both
return eigenvalues in ascending order, as ``symeig`` did. ViViT's
eigenvalues-only path therefore runs ``eigvalsh`` (LAPACK ``syevd`` without
vectors) and its top-5 path a full ``eigh``. curvext's
``GGNEigen(eigenvectors=False)`` computes eigenvalues only too (since commit
114bfeb), and ``GGNEigen(top_k=5)`` only the 5 pairs it returns: on CPU with
SciPy (test extra) and threadpoolctl (installed with scikit-learn,
the examples extra) installed through
LAPACK's ``syevr`` (``curvext.extensions.ggn_eigen.symmetric_eigen``), with
``torch.get_num_threads()`` BLAS threads, otherwise through
``torch.linalg``. Both sides do the same work otherwise: one forward, one
backward, the Gram matrix of the same per-sample vectors (1152 vs 1280 wide
for the exact GGN, see above), its eigendecomposition and, with
eigenvectors, the 5 GGN eigenvectors in parameter space.

``--parts``, ``--modes`` and ``--models`` restrict a run to some rows, e.g.
``--parts step --modes 1 --sizes 32`` for one logging row.

**Part 2, cost of logging**: one SGD training step (zero_grad, forward, loss,
backward, ``optimizer.step()``) of the MLP with ``curvext.monitor.EigenLogger``
(``mc_samples=1``, ``top_k=5``, records in memory) on a logged step, against
the same step on a step the logger skips (``backpack()`` with no extensions),
for N = 32 … 512; plus the exact GGN at N = 128.
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
from typing import Dict

import torch
from torch import nn


def _symeig(self, eigenvectors=False, upper=True):
    """``Tensor.symeig`` (a stub that raises since PyTorch 2.0) on ``torch.linalg``,
    as PyTorch's own deprecation message prescribes."""
    uplo = "U" if upper else "L"
    if eigenvectors:
        return torch.linalg.eigh(self, UPLO=uplo)
    return torch.linalg.eigvalsh(self, UPLO=uplo), torch.empty(
        0, dtype=self.dtype, device=self.device
    )


torch.Tensor.symeig = _symeig

import backpack as bp  # noqa: E402
from engine_vs_backpack import MODEL_DESCRIPTIONS, NUM_CLASSES, build_model  # noqa: E402
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
    run_memory_probe,
    source_line,
    time_cells,
    write_report,
)
from vivit.linalg.eigh import EighComputation  # noqa: E402
from vivit.linalg.eigvalsh import EigvalshComputation  # noqa: E402

import curvext  # noqa: E402
from curvext.extensions import GGNEigen  # noqa: E402
from curvext.monitor import EigenLogger  # noqa: E402

BATCH = 128
TOP_K = 5
TARGET_RATIO = 0.67
LOGGING_TARGET = 2.0
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def make_data(batch: int, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 1, 28, 28, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return inputs.to(device), targets.to(device)


def _top(evals: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """The ``k`` largest, ascending (ViViT lists ascending, curvext largest first)."""
    return evals.detach().double().cpu().sort().values[-k:]


# --------------------------------------------------------------------------
# cells: something with unit(), clear() and top() (eigenvalues, for agreement)
# --------------------------------------------------------------------------
class EigenCell:
    """Part 1: one library's eigen-extension on one model."""

    def __init__(self, kind: str, base: nn.Module, mode: int, variant: str, device):
        self.kind, self.device = kind, device
        model, loss_fn = copy.deepcopy(base).to(device), nn.CrossEntropyLoss().to(device)
        vectors = variant == "eigvecs"
        if kind == "curvext":
            self.model, self.loss_fn = curvext.extend(model), curvext.extend(loss_fn)
            self.extension = GGNEigen(
                top_k=TOP_K if vectors else None, mc_samples=mode, eigenvectors=vectors
            )
            self.fields = ["ggn_eigvals", "ggn_eigvecs"]
        else:
            self.model, self.loss_fn = bp.extend(model), bp.extend(loss_fn)
            if vectors:
                self.computation = EighComputation(mc_samples=mode)
                self.group = {
                    "params": [p for p in self.model.parameters()],
                    "criterion": lambda evals: list(range(len(evals) - TOP_K, len(evals))),
                }
            else:
                self.computation = EigvalshComputation(mc_samples=mode)
                self.group = {"params": [p for p in self.model.parameters()]}
            self.extension = self.computation.get_extension()
            self.fields = [self.extension.savefield]

    def clear(self):
        if self.kind == "vivit":
            self.computation._evals.clear()  # a unit that computes nothing is seen
        for param in self.model.parameters():
            param.grad = None
            for field in self.fields:
                param.__dict__.pop(field, None)

    def unit(self, inputs, targets):
        loss = self.loss_fn(self.model(inputs), targets)
        if self.kind == "curvext":
            with curvext.backpack(self.extension):
                loss.backward()
        else:
            # ViViT's hook is spent after one backward pass: a new one per unit
            hook = self.computation.get_extension_hook([self.group])
            with bp.backpack(self.extension, extension_hook=hook):
                loss.backward()

    def top(self) -> torch.Tensor:
        if self.kind == "curvext":
            return _top(self.extension.result(0)[0])
        result = self.computation.get_result(self.group)
        return _top(result[0] if isinstance(result, tuple) else result)


class StepCell:
    """Part 2: one SGD training step with an EigenLogger, logged or skipped."""

    def __init__(self, base: nn.Module, mode: int, logged: bool, device):
        self.model = curvext.extend(copy.deepcopy(base).to(device))
        self.loss_fn = curvext.extend(nn.CrossEntropyLoss().to(device))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        # every=1 logs every step; a huge `every` skips every step after the first
        self.logger = EigenLogger(None, top_k=TOP_K, mc_samples=mode, every=1 if logged else 10**9)
        self.logger.num_steps = 0 if logged else 1

    def clear(self):
        self.logger.records.clear()

    def unit(self, inputs, targets):
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(inputs), targets)
        with curvext.backpack(*self.logger.extensions()):
            loss.backward()
        self.logger.step(loss)
        self.optimizer.step()

    def top(self):
        return None


# --------------------------------------------------------------------------
# the floor: the same computation written out in plain PyTorch (MLP only)
# --------------------------------------------------------------------------
def _record_forward(model: nn.Sequential, inputs: torch.Tensor):
    """Forward through Flatten/Linear/ReLU; returns the output, each Linear's
    input ``[N, d_in]`` and output ``[N, d_out]``."""
    linear_inputs, linear_outputs, hidden = [], [], inputs
    for layer in model:
        if isinstance(layer, nn.Linear):
            linear_inputs.append(hidden)
            hidden = layer(hidden)
            linear_outputs.append(hidden)
        else:
            hidden = layer(hidden)
    return hidden, linear_inputs, linear_outputs


def _mc_column(logits: torch.Tensor) -> torch.Tensor:
    """One MC sqrt-GGN column ``[N, C]`` of the mean cross-entropy."""
    with torch.no_grad():
        prob = logits.softmax(1)
        labels = torch.multinomial(prob, 1).squeeze(1)
        return (nn.functional.one_hot(labels, prob.shape[1]).to(prob) - prob) / (
            logits.shape[0] ** 0.5
        )


def _floor_gram(linear_inputs, column_grads) -> torch.Tensor:
    """``Σ_layers (G Gᵀ) ⊙ (A Aᵀ + 1)`` ``[N, N]``: weight and bias of every Linear."""
    gram = None
    for inputs, grads in zip(linear_inputs, column_grads):
        block = (grads @ grads.T) * (inputs.detach() @ inputs.detach().T + 1)
        gram = block if gram is None else gram.add_(block)
    return gram


class FloorEigenCell:
    """Part 1 floor: GGNEigen(mc_samples=1) on the MLP as plain PyTorch: forward,
    backward, one MC column backpropagated to the Linear outputs, the Gram
    matrix from the factors, ``eigvalsh`` or ``eigh`` and the top-5
    eigenvectors in parameter space (``Σ_n u_n g_n [a_n, 1]ᵀ / √λ``). No
    library code: the least time any implementation of the Gram-space method
    needs on this machine (not a contender with a target)."""

    def __init__(self, base: nn.Module, mode: int, variant: str, device):
        if mode != 1 or not all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for m in base):
            raise ValueError("the floor is written for the MLP with mc_samples=1")
        self.model = copy.deepcopy(base).to(device)
        self.vectors = variant == "eigvecs"
        self.evals = None

    def clear(self):
        for param in self.model.parameters():
            param.grad = None

    def unit(self, inputs, targets):
        logits, linear_inputs, linear_outputs = _record_forward(self.model, inputs)
        nn.functional.cross_entropy(logits, targets).backward(retain_graph=True)
        column_grads = torch.autograd.grad(logits, linear_outputs, _mc_column(logits))
        gram = _floor_gram(linear_inputs, column_grads)
        if not self.vectors:
            self.evals = torch.linalg.eigvalsh(gram)
            return
        evals, evecs = torch.linalg.eigh(gram)
        self.evals, coefficients = evals[-TOP_K:], evecs[:, -TOP_K:] / evals[-TOP_K:].sqrt()
        self.eigvecs = []
        for inputs, grads in zip(linear_inputs, column_grads):
            weighted = coefficients.T[:, :, None] * grads[None]  # [k, N, d_out]
            self.eigvecs.append((weighted.mT @ inputs.detach(), weighted.sum(1)))

    def top(self):
        return _top(self.evals)


class FloorStepCell:
    """Part 2 floor: a logged SGD step of the MLP (``mc_samples=1``) as plain
    PyTorch: the step, one batched backward of the MC column and the
    gradient column to the Linear outputs, the Gram matrix, ``eigvalsh``
    (top-5, rank, trace) and the two noise sums (``‖Σ_n g_n‖²`` read from
    ``p.grad``, ``Σ_n ‖g_n‖²`` from the factors)."""

    def __init__(self, base: nn.Module, device):
        self.model = copy.deepcopy(base).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.records = []

    def clear(self):
        self.records.clear()

    def unit(self, inputs, targets):
        self.optimizer.zero_grad()
        logits, linear_inputs, linear_outputs = _record_forward(self.model, inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        loss.backward(retain_graph=True)
        with torch.no_grad():  # the gradient column: d loss / d logits
            logits_grad = (
                logits.softmax(1) - nn.functional.one_hot(targets, logits.shape[1]).to(logits)
            ) / logits.shape[0]
        columns = torch.stack((_mc_column(logits), logits_grad))
        grads = torch.autograd.grad(logits, linear_outputs, columns, is_grads_batched=True)
        gram = _floor_gram(linear_inputs, [g[0] for g in grads])
        evals = torch.linalg.eigvalsh(gram)
        sample_l2 = sum(
            (g[1].square().sum(1) * (a.detach().square().sum(1) + 1)).sum(dtype=torch.float64)
            for a, g in zip(linear_inputs, grads)
        )
        grad_norm_sq = sum(
            p.grad.square().sum(dtype=torch.float64) for p in self.model.parameters()
        )
        stats = torch.stack((evals[-TOP_K:].sum(), evals.sum(), (evals > 0).sum()))
        self.records.append((stats.tolist(), float(grad_norm_sq), float(sample_l2), float(loss)))
        self.optimizer.step()

    def top(self):
        return None


class WithData:
    """A cell whose unit takes the batch, bound to it (a harness cell)."""

    def __init__(self, cell, data):
        self.cell, self.data = cell, data

    def clear(self):
        self.cell.clear()

    def unit(self):
        self.cell.unit(*self.data)

    def top(self):
        return self.cell.top()


def make_cell(spec: dict, device: torch.device) -> WithData:
    torch.manual_seed(spec["seed"])
    base = build_model(spec["model"])
    if spec["part"] == "eigen" and spec["kind"] == "floor":
        cell = FloorEigenCell(base, spec["mode"], spec["variant"], device)
    elif spec["part"] == "eigen":
        cell = EigenCell(spec["kind"], base, spec["mode"], spec["variant"], device)
    elif spec["kind"] == "floor":
        cell = FloorStepCell(base, device)
    else:
        cell = StepCell(base, spec["mode"], spec["kind"] == "logged", device)
    return WithData(cell, make_data(spec["batch"], device, spec["seed"]))


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------
def measure(specs: Dict[str, dict], batch: int, device, args) -> dict:
    """Time the cells of ``specs`` (kind -> spec) together; memory one by one."""
    specs = {kind: {**spec, "batch": batch} for kind, spec in specs.items()}
    cells = {kind: make_cell(spec, device) for kind, spec in specs.items()}
    (times, _), foreign = measure_quietly(functools.partial(time_cells, cells, device, args), args)
    result = {
        "times_ms": times,
        "foreign_load": foreign,
        "ms": {kind: statistics.median(values) for kind, values in times.items()},
        "top": {kind: cell.top() for kind, cell in cells.items()},
        "mem": {},
    }
    for kind, spec in specs.items():
        result["mem"][kind] = (
            None
            if args.no_memory or kind == "floor"
            else peak_memory(__file__, spec, cells[kind], device)
        )
    del cells
    gc.collect()
    return result


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
MODE_NAMES = {0: "exact", 1: "mc_samples=1"}
VARIANT_NAMES = {"eigvals": "eigenvalues only", "eigvecs": f"top-{TOP_K} eigenpairs"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=5, busy_retries=2)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument(
        "--sizes", default="32,64,128,256,512", help="batch sizes of the logging sweep (part 2)"
    )
    parser.add_argument(
        "--parts",
        default="eigen,step",
        help="eigen (GGNEigen vs ViViT), step (cost of logging), or both",
    )
    parser.add_argument("--modes", default="0,1", help="0 (exact GGN), 1 (mc_samples=1)")
    args = finish_common_arguments(parser.parse_args(argv), "ggn_eigen")
    args.models = [m for m in args.models.split(",") if m]
    args.parts = [p for p in args.parts.split(",") if p]
    args.modes = [int(m) for m in args.modes.split(",") if m]
    args.sizes = [int(n) for n in args.sizes.split(",") if n]
    return args


def _eigen_kinds(model: str, mode: int):
    return ("curvext", "vivit") + (("floor",) if model == "mlp" and mode == 1 else ())


def _floor(row, reference: str) -> str:
    """The floor's time and its ratio to ``reference``, or blanks."""
    if "floor" not in row["ms"]:
        return "| | "
    return f"| {row['ms']['floor']:.1f} | {row['ms']['floor'] / row['ms'][reference]:.2f} "


def _rel_top(a, b) -> str:
    if a is None or b is None or len(a) != len(b):
        return "n/a"
    return f"{float((a - b).norm() / b.norm()):.0e}"


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe is not None:
        return run_memory_probe(args.memory_probe, make_cell)
    device = device_for(args)
    started, clock = datetime.datetime.utcnow(), time.perf_counter()
    machine = machine_line(device, ("vivit-for-pytorch",))
    source, load_start = source_line(), load_average()
    print(machine, source, f"load average: {load_start}", sep="\n", flush=True)

    eigen_rows = []
    for model in args.models if "eigen" in args.parts else []:
        for mode in args.modes:
            for variant in ("eigvals", "eigvecs"):
                specs = {
                    kind: {
                        "part": "eigen",
                        "kind": kind,
                        "model": model,
                        "mode": mode,
                        "variant": variant,
                        "seed": args.seed,
                    }
                    for kind in _eigen_kinds(model, mode)
                }
                result = measure(specs, BATCH, device, args)
                result.update(model=model, mode=mode, variant=variant)
                result["agreement"] = (
                    _rel_top(result["top"]["curvext"], result["top"]["vivit"])
                    if mode == 0
                    else "MC"
                )
                eigen_rows.append(result)
                ms, mem = result["ms"], result["mem"]
                print(
                    f"{model} {MODE_NAMES[mode]:13s} {VARIANT_NAMES[variant]:18s} "
                    f"curvext {ms['curvext']:9.2f} ms  ViViT {ms['vivit']:9.2f} ms  "
                    f"ratio {ms['curvext'] / ms['vivit']:.2f}  mem {mb(mem['curvext'])} / "
                    f"{mb(mem['vivit'])} MB  diff {result['agreement']}  other load "
                    f"{pct(result['foreign_load'])}"
                    + (f"  floor {ms['floor']:.2f} ms" if "floor" in ms else ""),
                    flush=True,
                )

    step_rows = []
    for mode, sizes in ((1, args.sizes), (0, [BATCH])):
        if "step" not in args.parts or mode not in args.modes:
            continue
        for batch in sizes:
            specs = {
                kind: {
                    "part": "step",
                    "kind": kind,
                    "model": "mlp",
                    "mode": mode,
                    "seed": args.seed,
                }
                for kind in ("logged", "unlogged") + (("floor",) if mode == 1 else ())
            }
            result = measure(specs, batch, device, args)
            result.update(mode=mode, batch=batch)
            step_rows.append(result)
            ms, mem = result["ms"], result["mem"]
            print(
                f"step mlp {MODE_NAMES[mode]:13s} N={batch:<4d} logged {ms['logged']:9.2f} ms  "
                f"unlogged {ms['unlogged']:8.2f} ms  ratio {ms['logged'] / ms['unlogged']:.2f}  "
                f"mem {mb(mem['logged'])} / {mb(mem['unlogged'])} MB  other load "
                f"{pct(result['foreign_load'])}",
                flush=True,
            )

    report = render(
        eigen_rows,
        step_rows,
        args,
        device,
        machine,
        source,
        load_start,
        started,
        time.perf_counter() - clock,
    )
    raw = {
        "machine": machine,
        "source": source,
        "args": {k: v for k, v in vars(args).items()},
        "eigen": [{k: v for k, v in r.items() if k != "top"} for r in eigen_rows],
        "steps": [{k: v for k, v in r.items() if k != "top"} for r in step_rows],
    }
    write_report(report, raw, args.out)


def render(
    eigen_rows, step_rows, args, device, machine, source, load_start, started, elapsed
) -> str:
    memory = memory_method(device, args.no_memory)
    lines = [
        f"# GGNEigen vs ViViT, and the cost of eigenvalue logging ({device.type})",
        "",
        f"Machine: {machine}",
        "",
        f"Source: {source}.",
        "",
        f"Load average (1, 5, 15 min) at start: {load_start}; at end: {load_average()}.",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, float32: median of at least "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up run(s) each "
        + (
            f"(more, up to {args.max_repeats}, while a row's timed runs took less than "
            f"{args.min_time:g} s) "
            if args.min_time > 0
            else ""
        )
        + f"(column `n`). Peak MB = extra memory of one unit over what is allocated "
        f"before it ({memory}). ViViT 1.0.0 runs with `Tensor.symeig` patched to "
        "`torch.linalg.eigh` (see the script's docstring).",
        "",
        "Models: "
        + "; ".join(f"`{name}` = {MODEL_DESCRIPTIONS[name]}" for name in args.models)
        + ".",
        "",
        f"## GGNEigen vs ViViT (batch {BATCH}, full GGN, one group)",
        "",
        "Unit = forward + loss + backward with the extension active. Eigenvalues only: "
        "`GGNEigen(eigenvectors=False)` vs `EigvalshComputation`; top-5 eigenpairs: "
        f"`GGNEigen(top_k={TOP_K})` vs `EighComputation` with the 5 largest as criterion. "
        f"Target: ratio <= {TARGET_RATIO} and no more peak memory.",
        "",
        "| model | GGN | computes | curvext ms | ViViT ms | ratio | curvext peak MB "
        "| ViViT peak MB | target | n | other load | top-5 rel. diff | floor ms "
        "| floor / ViViT |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- "
        "| ---: | ---: |",
    ]
    for row in eigen_rows:
        ms, mem = row["ms"], row["mem"]
        ratio = ms["curvext"] / ms["vivit"]
        memory_ok = mem["curvext"] is None or mem["vivit"] is None or mem["curvext"] <= mem["vivit"]
        mark = "meets" if ratio <= TARGET_RATIO and memory_ok else "**misses**"
        lines.append(
            f"| {row['model']} | {MODE_NAMES[row['mode']]} | {VARIANT_NAMES[row['variant']]} "
            f"| {ms['curvext']:.1f} | {ms['vivit']:.1f} | {ratio:.2f} | {mb(mem['curvext'])} "
            f"| {mb(mem['vivit'])} | {mark} | {len(row['times_ms']['curvext'])} "
            f"| {pct(row['foreign_load'])} | {row['agreement']} {_floor(row, 'vivit')}|"
        )
    lines += [
        "",
        "Ratio < 1 means curvext is faster. `top-5 rel. diff`: ||λ_curvext − λ_ViViT|| / "
        "||λ_ViViT|| over the 5 largest eigenvalues (exact GGN; MC rows draw different "
        "samples). The exact Gram matrix is 1152 wide in curvext (C−1 columns per "
        "sample) and 1280 in ViViT (C). `floor`: the same computation written out in "
        "plain PyTorch for this MLP, no library code (`FloorEigenCell`: forward, "
        "backward, the MC column's backward, Gram matrix from the factors, "
        "eigendecomposition, eigenvectors): `floor / ViViT` is the best ratio any "
        "implementation of the method reaches here, timed in the same interleaved "
        "repeats.",
        "",
        "## Cost of a logged training step (MLP)",
        "",
        "Unit = `zero_grad`, forward, loss, backward inside `backpack(*logger.extensions())`, "
        "`logger.step(loss)`, `optimizer.step()` (SGD), with `EigenLogger(top_k=5)`; "
        "`logged`: a step the logger records (GGNEigen without eigenvectors + "
        "gradient noise), `unlogged`: a step it skips (no extensions). Target: ratio <= "
        f"{LOGGING_TARGET:g} for `mc_samples=1`.",
        "",
        "| GGN | N | Gram size | logged ms | unlogged ms | ratio | logged peak MB "
        "| unlogged peak MB | target | n | other load | floor ms | floor / unlogged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
        "| ---: | ---: |",
    ]
    for row in step_rows:
        ms, mem = row["ms"], row["mem"]
        ratio = ms["logged"] / ms["unlogged"]
        mark = "" if row["mode"] != 1 else "meets" if ratio <= LOGGING_TARGET else "**misses**"
        size = row["batch"] * (1 if row["mode"] == 1 else NUM_CLASSES - 1)
        lines.append(
            f"| {MODE_NAMES[row['mode']]} | {row['batch']} | {size} | {ms['logged']:.1f} "
            f"| {ms['unlogged']:.1f} | {ratio:.2f} | {mb(mem['logged'])} "
            f"| {mb(mem['unlogged'])} | {mark} | {len(row['times_ms']['logged'])} "
            f"| {pct(row['foreign_load'])} {_floor(row, 'unlogged')}|"
        )
    lines += [
        "",
        "`floor`: the logged step written out in plain PyTorch (`FloorStepCell`: the "
        "step, one batched backward of the MC and gradient columns, Gram matrix, "
        "`eigvalsh`, the noise sums), the least a logged step costs here.",
        "",
        "`other load`: share of all CPUs other processes used while the row was timed "
        "(a high value means the row is unreliable).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
