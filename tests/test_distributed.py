"""Data sets sharded over two ``gloo`` processes on localhost (:mod:`curvext.distributed`).

One spawn of two processes (:func:`spawn_ranks`, in one test, so that
``pytest -n 2`` spawns once) does every check, each rank with its own shard
of the batches, and saves what it got; the ``check_*`` functions compare
every rank's results with dense float64 references of the whole data set
built here with ``torch.func`` (``tests/references.py``), never with
curvext's own single-process results. Shards are unequal (three
batches, 10 samples, on rank 0; one batch, 4 samples, on rank 1) and, for the
empty-shard checks, everything on rank 0 and nothing on rank 1. The process
group has a 60 s timeout, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call, hessian

from curvext.linalg import hutchinson_trace
from curvext.operators import (
    DiagonalOperator,
    EFOperator,
    EKFACOperator,
    GGNOperator,
    HessianOperator,
    KronOperator,
)
from tests.references import DenseReference, kfac_reference, kron, loss_scaling

WORLD_SIZE = 2
SIZES = (3, 5, 2, 4)  # batch sizes; 14 samples
SHARDS = {"unequal": ([0, 1, 2], [3]), "empty": ([0, 1, 2, 3], [])}
OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EFOperator}
DAMPING = 0.5
MC_SAMPLES = 5000


def make_problem():
    """An MLP classifier; class weights and an ignored class, so that the
    mean's denominator is the summed weights of the kept targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]), ignore_index=1)
    X = torch.randn(sum(SIZES), 3)
    y = torch.tensor([0, 1, 2, 2, 0, 1, 1, 2, 0, 2, 0, 2, 1, 0])
    return model, loss_fn, X, y


def batches_of(X, y):
    return list(zip(X.split(list(SIZES)), y.split(list(SIZES))))


def probes(num_params: int) -> torch.Tensor:
    return torch.randn(
        num_params, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )


def _error_of(call):
    """``(type name, message)`` of what ``call()`` raises, or ``None``."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return type(error).__name__, str(error)
    return None


def _checks(rank: int) -> dict:
    """Everything one rank computes; the same collectives in the same order on both."""
    model, loss_fn, X, y = make_problem()
    params = list(model.parameters())
    batches = batches_of(X, y)
    shard = [batches[i] for i in SHARDS["unequal"][rank]]
    empty_shard = [batches[i] for i in SHARDS["empty"][rank]]
    V = probes(sum(p.numel() for p in params))
    results = {}
    for kind, operator in OPERATORS.items():
        A = operator(model, loss_fn, params, shard, num_data=len(X))
        results[f"{kind} @ V"] = A @ V
    results["mc fisher @ V"] = GGNOperator(model, loss_fn, params, shard, mc_samples=MC_SAMPLES) @ V
    G = GGNOperator(model, loss_fn, params, shard)
    results["trace"] = hutchinson_trace(
        G, num_matvecs=4, generator=torch.Generator().manual_seed(1)
    )
    results["cg"] = G.inverse(damping=DAMPING, tol=1e-12, max_iter=200) @ V[:, 0]
    group = dist.new_group([0, 1])
    results["ggn on a group @ V"] = (
        GGNOperator(model, loss_fn, params, shard, distributed=group) @ V
    )
    results["local ggn @ V"] = GGNOperator(model, loss_fn, params, shard, distributed=False) @ V
    results["kron"] = KronOperator.from_data(model, loss_fn, shard).to_dense()
    results["diagonal"] = DiagonalOperator.from_data(model, loss_fn, shard).diag()
    results["ekfac"] = EKFACOperator.from_data(model, loss_fn, shard).to_dense()
    # rank 1 without any batch
    results["empty: ggn @ V"] = GGNOperator(model, loss_fn, params, empty_shard) @ V
    results["empty: kron"] = KronOperator.from_data(model, loss_fn, empty_shard).to_dense()
    results["empty: ekfac"] = EKFACOperator.from_data(model, loss_fn, empty_shard).to_dense()
    # π-damping gives a bias its weight's damping of the shared G: sharing survives the sums
    for name, part in (("kron", shard), ("empty: kron", empty_shard)):
        damped = KronOperator.from_data(model, loss_fn, part).inverse(
            damping=DAMPING, use_heuristic_damping=True
        )
        results[f"{name} pi-damped inverse @ V"] = damped @ V

    # refusals, on both ranks in step
    errors = results["errors"] = {}
    errors["different probes"] = _error_of(
        lambda: hutchinson_trace(G, num_matvecs=2, generator=torch.Generator().manual_seed(rank))
    )
    other = make_problem()[0]
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1e-3
    errors["different params"] = _error_of(
        lambda: GGNOperator(other, loss_fn, list(other.parameters()), shard)
    )
    errors["different params, from_data"] = _error_of(
        lambda: DiagonalOperator.from_data(other, loss_fn, shard)
    )
    broken = shard if rank == 0 else [3.0]
    errors["one rank fails"] = _error_of(lambda: GGNOperator(model, loss_fn, params, broken))
    errors["one rank fails, from_data"] = _error_of(
        lambda: KronOperator.from_data(model, loss_fn, broken)
    )
    one_shot = shard if rank == 0 else iter(shard)
    errors["one rank passes an iterator to EKFAC"] = _error_of(
        lambda: EKFACOperator.from_data(model, loss_fn, one_shot)
    )
    errors["empty everywhere"] = _error_of(lambda: GGNOperator(model, loss_fn, params, []))
    errors["empty everywhere, from_data"] = _error_of(
        lambda: KronOperator.from_data(model, loss_fn, [])
    )
    local_count = sum(len(batch_y) for _, batch_y in shard)
    errors["num_data of the shard"] = _error_of(
        lambda: GGNOperator(model, loss_fn, params, shard, num_data=local_count)
    )
    # a group of rank 0 only: rank 1 is no member, rank 0 computes alone
    solo = dist.new_group([0])
    errors["not a member"] = _error_of(
        lambda: GGNOperator(model, loss_fn, params, shard, distributed=solo)
    )
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(_checks(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_ranks():
    """Both ranks' results (``[rank 0's, rank 1's]``)."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(init_file, out_dir), nprocs=WORLD_SIZE, join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            for rank in range(WORLD_SIZE)
        ]


# ---- references of the whole data set (torch.func only) ----------------------


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def dense_hessian(model, loss_fn, X, y):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(theta):
        blocks = theta.split([s.numel() for s in shapes])
        values = {n: b.view(s) for n, b, s in zip(names, blocks, shapes)}
        return loss_fn(functional_call(model, values, (X,)), y)

    return hessian(loss_of)(flat_params(model))


def dense_ef(model, loss_fn, X, y):
    """``c Σ_n g_n g_nᵀ`` with ``g_n`` the gradient of sample ``n``'s summed loss."""
    reference = DenseReference(model, loss_fn, X, y)
    scaled = torch.cat(  # c g_n, [N, P]
        [reference.per_sample_grads(name).flatten(1) for name in reference.names], 1
    )
    scaling = loss_scaling(loss_fn, model(X).detach(), y)
    return scaled.T @ scaled / scaling


def dense(kind, model, loss_fn, X, y):
    if kind == "hessian":
        return dense_hessian(model, loss_fn, X, y)
    if kind == "ef":
        return dense_ef(model, loss_fn, X, y)
    return DenseReference(model, loss_fn, X, y).ggn()


def dense_kfac(model, loss_fn, X, y):
    blocks = []
    for module in (model[0], model[2]):
        factors = kfac_reference(model, loss_fn, X, y, module, "type-2", "expand")
        blocks += [kron(factors["weight"]), kron(factors["bias"])]
    return torch.block_diag(*blocks)


def dense_ekfac(model, loss_fn, X, y):
    r"""Per block :math:`Q\,\mathrm{diag}(Q^\top G_b Q)\,Q^\top`, ``Q`` the
    Kronecker product of the eigenvectors of the reference KFAC factors and
    ``G_b`` the exact GGN block (type-2 EKFAC's corrected eigenvalues)."""
    reference = DenseReference(model, loss_fn, X, y)
    blocks = []
    for prefix, module in (("0", model[0]), ("2", model[2])):
        factors = kfac_reference(model, loss_fn, X, y, module, "type-2", "expand")
        for name in ("weight", "bias"):
            Q = kron([torch.linalg.eigh(f).eigenvectors for f in factors[name]])
            corrections = (Q.T @ reference.block(f"{prefix}.{name}") @ Q).diagonal()
            blocks.append(Q @ torch.diag(corrections) @ Q.T)
    return torch.block_diag(*blocks)


def whole_problem():
    model, loss_fn, X, y = make_problem()
    return model, loss_fn, X, y, probes(flat_params(model).numel())


def each_rank(runs, key):
    return [(rank, result[key]) for rank, result in enumerate(runs)]


# ---- products and what is built on them ----------------------------------------


def check_products(runs, problem):
    model, loss_fn, X, y, V = problem
    for kind in OPERATORS:
        expected = dense(kind, model, loss_fn, X, y) @ V
        for rank, product in each_rank(runs, f"{kind} @ V"):
            torch.testing.assert_close(product, expected, msg=f"{kind}, rank {rank}")


def check_mc_fisher(runs, problem):
    """The MC Fisher over shards (rank ``r`` seeded ``seed + r``) estimates the
    GGN: with 5000 samples per data point the relative error of a product is
    about ``1/sqrt(5000)`` ≈ 1.4% times a constant of order one; 10% allows for
    that constant."""
    model, loss_fn, X, y, V = problem
    expected = DenseReference(model, loss_fn, X, y).ggn() @ V
    for rank, product in each_rank(runs, "mc fisher @ V"):
        error = (product - expected).norm() / expected.norm()
        assert error < 0.1, (rank, error.item())


def check_identical_results(runs, problem):
    """An all_reduce leaves the same bits on every rank, so iterative methods
    (CG) and estimators take the same path everywhere."""
    for key in ("ggn @ V", "mc fisher @ V", "trace", "cg", "kron", "ekfac", "empty: ekfac"):
        assert torch.equal(runs[0][key], runs[1][key]), key


def check_estimator_and_cg(runs, problem):
    model, loss_fn, X, y, V = problem
    G = DenseReference(model, loss_fn, X, y).ggn()
    expected_trace = hutchinson_trace(G, num_matvecs=4, generator=torch.Generator().manual_seed(1))
    expected_solution = torch.linalg.solve(G + DAMPING * torch.eye(len(G)), V[:, 0])
    for rank, result in enumerate(runs):
        torch.testing.assert_close(result["trace"], expected_trace, msg=f"rank {rank}")
        torch.testing.assert_close(
            result["cg"], expected_solution, rtol=1e-7, atol=1e-9, msg=f"rank {rank}"
        )


def check_explicit_group_and_opting_out(runs, problem):
    """``distributed=<group>`` reduces over it; ``distributed=False`` keeps each
    rank's own shard (the GGN of that shard alone)."""
    model, loss_fn, X, y, V = problem
    expected = DenseReference(model, loss_fn, X, y).ggn() @ V
    batches = batches_of(X, y)
    for rank, result in enumerate(runs):
        torch.testing.assert_close(result["ggn on a group @ V"], expected)
        shard = [batches[i] for i in SHARDS["unequal"][rank]]
        X_shard = torch.cat([batch[0] for batch in shard])
        y_shard = torch.cat([batch[1] for batch in shard])
        local = DenseReference(model, loss_fn, X_shard, y_shard).ggn() @ V
        torch.testing.assert_close(result["local ggn @ V"], local, msg=f"rank {rank}")


# ---- from_data ---------------------------------------------------------------


def check_from_data(runs, problem):
    model, loss_fn, X, y, _ = problem
    expected = {
        "kron": dense_kfac(model, loss_fn, X, y),
        "diagonal": DenseReference(model, loss_fn, X, y).ggn().diagonal(),
        "ekfac": dense_ekfac(model, loss_fn, X, y),
    }
    for key, reference in expected.items():
        for rank, value in each_rank(runs, key):
            torch.testing.assert_close(value, reference, msg=f"{key}, rank {rank}")


def check_pi_damping_keeps_the_shared_factor(runs, problem):
    """The heuristic inverse over shards is that of one process over all the data
    (where the weight's and bias's G is one tensor, the bias gets the weight's π)."""
    model, loss_fn, X, y, V = problem
    whole = KronOperator.from_data(model, loss_fn, batches_of(X, y), distributed=False)
    expected = whole.inverse(damping=DAMPING, use_heuristic_damping=True) @ V
    for key in ("kron pi-damped inverse @ V", "empty: kron pi-damped inverse @ V"):
        for rank, value in each_rank(runs, key):
            torch.testing.assert_close(value, expected, msg=f"{key}, rank {rank}")


def check_a_rank_without_batches(runs, problem):
    model, loss_fn, X, y, V = problem
    expected = {
        "empty: ggn @ V": DenseReference(model, loss_fn, X, y).ggn() @ V,
        "empty: kron": dense_kfac(model, loss_fn, X, y),
        "empty: ekfac": dense_ekfac(model, loss_fn, X, y),
    }
    for key, reference in expected.items():
        for rank, value in each_rank(runs, key):
            torch.testing.assert_close(value, reference, msg=f"{key}, rank {rank}")


# ---- refusals ----------------------------------------------------------------

ERRORS = {  # check: per rank (error type, words the message must contain)
    "different probes": [("ValueError", "differs from rank 0's")] * 2,
    "different params": [("ValueError", "parameters on rank(s) [1] differ")] * 2,
    "different params, from_data": [("ValueError", "parameters on rank(s) [1] differ")] * 2,
    "one rank fails": [
        ("RuntimeError", "rank(s) [1] raised"),
        ("ValueError", "batch 0 of `data` is a float"),
    ],
    "one rank fails, from_data": [
        ("RuntimeError", "rank(s) [1] raised"),
        ("ValueError", "batch 0 of `data` is a float"),
    ],
    "one rank passes an iterator to EKFAC": [
        ("RuntimeError", "rank(s) [1] raised"),
        ("ValueError", "is an iterator"),
    ],
    "empty everywhere": [("ValueError", "no batch on any of the 2 ranks")] * 2,
    "empty everywhere, from_data": [("ValueError", "no batch on any of the 2 ranks")] * 2,
    "num_data of the shard": [("ValueError", "summed over the 2 ranks")] * 2,
    "not a member": [None, ("ValueError", "not a member")],
}


def check_refusals(runs, problem):
    for check, per_rank in ERRORS.items():
        for rank, expected in enumerate(per_rank):
            error = runs[rank]["errors"][check]
            if expected is None:
                assert error is None, (check, rank, error)
                continue
            assert error is not None, f"{check}: rank {rank} did not raise"
            assert error[0] == expected[0] and expected[1] in error[1], (check, rank, error)


CHECKS = [
    check_products,
    check_mc_fisher,
    check_identical_results,
    check_estimator_and_cg,
    check_explicit_group_and_opting_out,
    check_from_data,
    check_a_rank_without_batches,
    check_pi_damping_keeps_the_shared_factor,
    check_refusals,
]


def test_two_gloo_ranks_match_one_process_over_the_whole_data_set():
    """All checks of one spawn in one test: under ``pytest -n 2`` a module
    fixture would spawn once per xdist worker. Every check runs; the failures
    are reported together."""
    runs, problem = spawn_ranks(), whole_problem()
    failures = []
    for check in CHECKS:
        try:
            check(runs, problem)
        except AssertionError as failure:
            failures.append(f"{check.__name__}: {failure}")
    assert not failures, "\n\n".join(failures)


def test_distributed_argument_without_a_group():
    model, loss_fn, X, y = make_problem()
    params, batches = list(model.parameters()), batches_of(X, y)
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        GGNOperator(model, loss_fn, params, batches, distributed=True)
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        EKFACOperator.from_data(model, loss_fn, batches, distributed=True)
    with pytest.raises(TypeError, match="distributed must be None"):
        HessianOperator(model, loss_fn, params, batches, distributed="gloo")
    with pytest.raises(TypeError, match="distributed must be None"):
        EKFACOperator.from_data(model, loss_fn, batches, distributed=1)


def test_buffers_of_different_sizes_are_refused(monkeypatch):
    """Ranks reducing different shapes (e.g. probes with different numbers of
    columns): gloo may then add misaligned buffers silently, or abort the
    process, so this is not run over gloo; a fake ``all_reduce`` adds a rank 1
    whose buffer was one entry longer, as the table at the buffer's start
    reports it."""
    from curvext.distributed import Ranks, all_reduce_sum

    def all_reduce_with_a_longer_rank(buffer, group=None):
        # table [2 ranks, (length, 1 value), 2 pieces]: rank 1's length at 4
        buffer[4] = buffer[0] + 1

    monkeypatch.setattr(dist, "all_reduce", all_reduce_with_a_longer_rank)
    with pytest.raises(RuntimeError, match=r"different sizes \(\[3, 4\] entries"):
        all_reduce_sum([torch.ones(3)], Ranks(None, 0, 2), torch.zeros(1))


def test_fingerprints_tell_apart_a_float32_bias_offset_and_different_probes():
    # the reviewer's cases: a bias of a wide layer shifted by 0.01 on one rank, and
    # independent random probes, in float32; equal tensors must agree exactly
    from curvext.distributed import disagreeing_ranks, fingerprint

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 1024, generator=generator) / 32
    bias = torch.randn(1024, generator=generator) / 32
    same = fingerprint([weight, bias])
    shifted = fingerprint([weight, bias + 0.01])
    for other, expected in (
        (same, []),
        (fingerprint([weight.clone(), bias.clone()]), []),
        (shifted, [1]),
    ):
        values, bounds = torch.stack([same, other]).T.tolist()
        assert disagreeing_ranks(values, bounds, torch.float32) == expected
    probes = [torch.randn(1_000_000, 10, generator=generator) for _ in range(2)]
    values, bounds = torch.stack([fingerprint([probe]) for probe in probes]).T.tolist()
    assert disagreeing_ranks(values, bounds, torch.float32) == [1]
    inf = torch.tensor([float("inf"), 1.0])
    values, bounds = torch.stack([fingerprint([inf]), fingerprint([inf.clone()])]).T.tolist()
    assert disagreeing_ranks(values, bounds, torch.float32) == []


def test_a_distributed_data_parallel_model_is_refused(tmp_path):
    # a one-rank gloo group is enough to build the wrapper
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model, loss_fn, X, y = make_problem()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        for build in (KronOperator.from_data, DiagonalOperator.from_data, EKFACOperator.from_data):
            with pytest.raises(ValueError, match=r"DistributedDataParallel.*pass its \.module"):
                build(wrapped, loss_fn, batches_of(X, y))
    finally:
        dist.destroy_process_group()
