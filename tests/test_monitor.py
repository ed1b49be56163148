"""``curvext.monitor``: the eigenvalue logger against dense references.

One logged step's top eigenvalues, rank and trace are checked against the
eigenvalues of the dense GGN ``Jᵀ H J`` (``tests/references.py``,
``torch.func`` only), the gradient-noise statistics against dense per-sample
gradients; the trace also against ``GGNDiag`` in the same backward pass
(exact and MC). The rest checks the plumbing: ``every``, files (JSONL, CSV),
TensorBoard, plots and errors.
"""

import json
import math

import pytest
import torch

from curvext import backpack, extend
from curvext.extensions import GGNDiag, GGNEigen
from curvext.monitor import EigenLogger, GradientNoise
from tests.cases import CASES_BY_NAME, assert_close, dense_reference

CASE = CASES_BY_NAME["mlp_ce"]  # 4 samples, 3 classes: rank N·(C−1) = 8


def logged_step(logger, *extra, batch_size=None, case=CASE):
    """One training step of ``case`` with the logger; returns the model."""
    model, loss_fn, X, y = case.build(batch_size)
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(X), y)
    with backpack(*logger.extensions(), *extra):
        loss.backward()
    logger.step(loss)
    return model


def dense_noise(ref, names):
    grads = torch.cat([ref.per_sample_grads(n).flatten(1) for n in names], 1)  # [N, P]
    N, g = ref.N, grads.sum(0)
    return {
        "grad_norm_sq": float(g.square().sum()),
        "sample_grad_norm_sq": float(N * grads.square().sum()),
        "grad_variance": float((N * grads - g).square().sum() / (N - 1)),
    }


def assert_record_matches(record, ggn, noise, top_k):
    dense = torch.linalg.eigvalsh(ggn)
    scale = dense[-1].item()
    rank = int((dense > 1e-10 * scale).sum())
    assert record["rank"] == rank
    expected_top = dense.flip(0)[: min(top_k, rank)]
    assert_close(torch.tensor(record["top_eigvals"]), expected_top, msg="top eigenvalues")
    assert record["trace"] == pytest.approx(float(ggn.trace()), rel=1e-10)
    for key, value in noise.items():
        assert record[key] == pytest.approx(value, rel=1e-9), key
    assert record["noise_scale"] == pytest.approx(
        noise["grad_variance"] / noise["grad_norm_sq"], rel=1e-9
    )


def test_record_against_dense_ggn_and_gradients(tmp_path):
    ref = dense_reference(CASE.name)
    path = tmp_path / "log.jsonl"
    with EigenLogger(path, top_k=3) as logger:
        logged_step(logger)
    (record,) = logger.records
    assert record["step"] == 0 and record["group"] == 0
    assert record["batch_size"] == ref.N
    assert record["loss"] == pytest.approx(float(ref.loss))
    assert_record_matches(record, ref.ggn(), dense_noise(ref, ref.names), top_k=3)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == logger.records
    assert EigenLogger.read(path) == logger.records


def test_record_against_ggn_eigen_and_ggn_diag_in_same_pass():
    logger = EigenLogger(top_k=2)
    model = logged_step(logger, GGNDiag())
    (record,) = logger.records
    params = [p for p in model.parameters()]
    evals = params[0].ggn_eigvals  # the logger's GGNEigen: all nonzero eigenvalues
    assert record["top_eigvals"] == evals[:2].tolist()  # both largest first
    assert record["rank"] == len(evals)
    ggn_diag_trace = sum(float(p.ggn_diag.sum()) for p in params)
    assert record["trace"] == pytest.approx(ggn_diag_trace, rel=1e-10)


def test_mc_trace_matches_mc_ggn_diag():
    torch.manual_seed(3)
    logger = EigenLogger(top_k=2, mc_samples=2)
    model = logged_step(logger, GGNDiag(mc_samples=2))  # same columns, same samples
    (record,) = logger.records
    assert record["rank"] <= 4 * 2
    ggn_diag_trace = sum(float(p.ggn_diag.sum()) for p in model.parameters())
    assert record["trace"] == pytest.approx(ggn_diag_trace, rel=1e-10)


def test_param_groups_give_one_record_per_block():
    ref = dense_reference(CASE.name)
    model, loss_fn, X, y = CASE.build()
    model, loss_fn = extend(model), extend(loss_fn)
    named = dict(model.named_parameters())
    first, rest = ref.names[:2], ref.names[2:]
    groups = [{"params": [named[n] for n in first]}, {"params": [named[n] for n in rest]}]
    logger = EigenLogger(top_k=4, param_groups=groups)
    with backpack(*logger.extensions()):
        loss_fn(model(X), y).backward()
    records = logger.step()
    assert [r["group"] for r in records] == [0, 1] and records[0]["loss"] is None
    for record, names in zip(records, (first, rest)):
        assert_record_matches(record, ref.ggn(names), dense_noise(ref, names), top_k=4)


def test_every_logs_only_every_nth_step_and_costs_nothing_in_between():
    logger = EigenLogger(top_k=1, every=3)
    model, loss_fn, X, y = CASE.build()
    model, loss_fn = extend(model), extend(loss_fn)
    for step in range(7):
        extensions = logger.extensions()
        assert bool(extensions) == (step % 3 == 0)
        for p in model.parameters():
            p.__dict__.pop("ggn_eigvals", None)
        with backpack(*extensions):
            loss_fn(model(X), y).backward()
        computed = hasattr(next(model.parameters()), "ggn_eigvals")
        assert computed == (step % 3 == 0), "extensions ran on a step not logged"
        returned = logger.step()
        assert (returned is None) == (step % 3 != 0)
    assert [r["step"] for r in logger.records] == [0, 3, 6]
    assert logger.num_steps == 7


def test_csv_round_trip_pads_missing_eigenvalues(tmp_path):
    path = tmp_path / "sub" / "log.csv"  # rank 2·(3−1) = 4 < top_k
    logger = EigenLogger(path, top_k=6)
    for _ in range(2):
        logged_step(logger, batch_size=2)
    logger.close()
    header, *rows = path.read_text().splitlines()
    assert header.split(",")[:6] == ["step", "group", "batch_size", "loss", "rank", "trace"]
    assert "top_eigval_6" in header and "noise_scale" in header
    assert rows[0].split(",")[6 + 4 : 6 + 6] == ["", ""]
    read = EigenLogger.read(path)
    assert len(read) == 2
    for got, expected in zip(read, logger.records):
        assert got.keys() == expected.keys()
        assert len(got["top_eigvals"]) == expected["rank"] == 4
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12), key


def test_single_sample_noise_is_nan_and_noise_can_be_off():
    logger = EigenLogger(top_k=1)
    logged_step(logger, batch_size=1)
    assert math.isnan(logger.records[0]["grad_variance"])
    assert math.isnan(logger.records[0]["noise_scale"])
    quiet = EigenLogger(top_k=1, noise=False)
    assert [type(e) for e in quiet.extensions()] == [GGNEigen]
    logged_step(quiet)
    assert "noise_scale" not in quiet.records[0]


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_go_to_the_writer():
    writer = FakeWriter()
    with EigenLogger(top_k=2, tensorboard=writer) as logger:
        logged_step(logger)
    record = logger.records[0]
    scalars = {tag: (value, step) for tag, value, step in writer.scalars}
    assert scalars["ggn/top_eigval_1"] == (record["top_eigvals"][0], 0)
    assert scalars["ggn/trace"] == (record["trace"], 0)
    assert scalars["noise/noise_scale"] == (record["noise_scale"], 0)
    assert scalars["loss"] == (record["loss"], 0)
    assert writer.closed


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    with EigenLogger(top_k=2, tensorboard=tmp_path / "runs") as logger:
        logged_step(logger)
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    logger = EigenLogger(top_k=3)
    for _ in range(3):
        logged_step(logger)
    logger.plot(tmp_path / "eigenvalues.png")
    assert (tmp_path / "eigenvalues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    logger = EigenLogger(top_k=1)
    logged_step(logger)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        logger.plot(tmp_path / "x.png")


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="every"):
        EigenLogger(every=0)
    with pytest.raises(ValueError, match="top_k"):
        EigenLogger(top_k=0)
    with pytest.raises(ValueError, match="mc_samples"):
        EigenLogger(mc_samples=-1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no parameters"):
        EigenLogger(param_groups=[{"params": []}])
    logger = EigenLogger()
    with pytest.raises(RuntimeError, match="logger.extensions\\(\\) was not called"):
        logger.step()
    logger.extensions()
    with pytest.raises(RuntimeError, match="no backward pass ran"):
        logger.step()
    with pytest.raises(ValueError, match="no records"):
        EigenLogger().plot("unused.png")


def test_gradient_noise_alone_matches_dense_reference():
    ref = dense_reference(CASE.name)
    model, loss_fn, X, y = CASE.build()
    model, loss_fn = extend(model), extend(loss_fn)
    noise = GradientNoise()
    with backpack(noise):
        loss_fn(model(X), y).backward()
    stats = noise.statistics(model.parameters())
    for key, value in dense_noise(ref, ref.names).items():
        assert stats[key] == pytest.approx(value, rel=1e-9), key
    assert not any(hasattr(p, GradientNoise.savefield) for p in model.parameters())
