"""Cockpit 1.0.2 (``cockpit-for-pytorch``), a BackPACK client, with its
``configuration("full")`` on ``curvext.compat.backpack.install()``, unchanged.

The same script runs Cockpit's instruments for three steps of SGD on BackPACK
and on curvext, each in a fresh process (``install()`` must run before
anything imports ``backpack``; the two run side by side):

- an MLP with sigmoid activations and a small CNN (convolutions, tanh,
  max-pooling, ReLU): every quantity Cockpit outputs, at every step, equals
  BackPACK's to 1e-6 relative (float64: they agree to round-off). The full
  configuration has no Monte-Carlo quantity (``TICDiag`` and ``HessTrace``
  use ``DiagHessian``; ``HessMaxEV``'s power iteration starts from
  ``torch.rand_like``, the same draw in both processes);
- a residual network (``h + block(h)`` in a ``forward``), where BackPACK
  fails (with ``extend(model)`` and with ``use_converter=True``) and curvext
  runs: each quantity is checked against dense autograd on a plain copy of
  the model (the Hessian, per-sample gradients from ``torch.func``, the GGN
  ``Jᵀ S J``); ``HessMaxEV`` against Cockpit's power iteration repeated on
  the dense Hessian from the same random start. Three instruments with the
  ``DiagGGNExact`` and ``DiagGGNMC`` curvatures are added there; the MC ones
  are checked for shape and sign only.

Float64 by ``torch.set_default_dtype``: Cockpit's ``HessMaxEV`` compares its
estimate with ``torch.Tensor([inf])``, which fails on float64 parameters
under the float32 default (on BackPACK too).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

for _package in ("cockpit", "backpack"):
    if importlib.util.find_spec(_package) is None:  # find_spec: imports nothing
        pytest.skip(f"needs {_package} (test extra)", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import warnings

    BACKEND, ARCHS = sys.argv[1], sys.argv[2].split(",")
    if BACKEND == "curvext":
        import curvext.compat.backpack as compat

        compat.install()
    warnings.filterwarnings("ignore")  # pkg_resources; HessMaxEV's iteration limit

    import backpack
    import torch
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.quantities import HessTrace, TICDiag
    from cockpit.quantities.utils_hists import histogram2d
    from cockpit.utils.configuration import configuration
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # see the module docstring
    N, C = 8, 3


    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 6)
            self.block = nn.Sequential(nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 6))
            self.out = nn.Linear(6, C)
            self.act1, self.act2 = nn.Tanh(), nn.Tanh()

        def forward(self, x):
            h = self.act1(self.inp(x.flatten(1)))
            h = h + self.block(h)
            return self.out(self.act2(h))


    def make(arch):
        torch.manual_seed(0)
        if arch == "mlp":
            layers = [nn.Flatten(), nn.Linear(16, 6), nn.Sigmoid(), nn.Linear(6, 5)]
            return nn.Sequential(*layers, nn.Sigmoid(), nn.Linear(5, C)), (1, 4, 4)
        if arch == "cnn":
            layers = [nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)]
            layers += [nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(16, C)]
            return nn.Sequential(*layers), (1, 6, 6)
        return Residual(), (1, 4, 4)


    # more instruments on the residual net, with other curvatures (Cockpit keys
    # its output by class name)
    class HessTraceGGN(HessTrace):
        def __init__(self, track_schedule, verbose=False):
            super().__init__(track_schedule, verbose, curvature="diag_ggn_exact")


    class HessTraceMC(HessTrace):
        def __init__(self, track_schedule, verbose=False):
            super().__init__(track_schedule, verbose, curvature="diag_ggn_mc")


    class TICDiagMC(TICDiag):
        def __init__(self, track_schedule, verbose=False):
            super().__init__(track_schedule, verbose, curvature="diag_ggn_mc")


    def power_iteration(H, vecs, maxiter=100, rtol=1e-3, atol=1e-6):
        # Cockpit's HVPLinearOperator.power_iteration, with a dense Hessian
        v = torch.cat([x.flatten() for x in vecs])
        v, eigval = v / v.norm(), torch.tensor([float("inf")])
        for _ in range(maxiter):
            new = H @ v
            new_eigval, v = v @ new, new / new.norm()
            if torch.allclose(eigval, new_eigval, rtol=rtol, atol=atol):
                return new_eigval.item()
            eigval = new_eigval
        return eigval.item()


    def references(model, X, y, rng_state):
        # the residual net's quantities from dense autograd on a plain copy
        plain, _ = make("res")
        plain.load_state_dict(model.state_dict())
        params = {n: p.detach() for n, p in plain.named_parameters()}
        sizes = [p.numel() for p in params.values()]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def logits(theta, x=X):
            split = dict(zip(params, theta.split(sizes)))
            return functional_call(plain, {n: t.view_as(params[n]) for n, t in split.items()}, x)

        def loss(theta, x, t):
            return nn.functional.cross_entropy(logits(theta, x), t)

        theta = torch.cat([p.flatten() for p in params.values()])
        H = torch.autograd.functional.hessian(lambda t: loss(t, X, y), theta)
        G = vmap(grad(lambda t, x, c: loss(t, x[None], c[None])), (None, 0, 0))(theta, X, y) / N
        g, dot = G.sum(0), G @ G.T  # G: BackPACK's BatchGrad (1/N ∇ℓ_n)
        g2, proj = g.square().sum(), N * dot.sum(1)
        J = torch.autograd.functional.jacobian(logits, theta)  # [N, C, P]
        p = logits(theta).softmax(-1)
        S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / N  # of the mean CE loss
        ggn_diag = torch.einsum("ncp,ncd,ndp->p", J, S, J)
        # HessMaxEV's start vectors: the instruments before it draw no random numbers
        torch.set_rng_state(rng_state)
        start = [torch.rand_like(p) for p in model.parameters()]
        eigs = torch.linalg.eigvalsh(H)
        ind = N * G  # Cockpit's histograms: individual gradients ∇ℓ_n
        lo, hi = (-1 + 1 / 40, -2 + 2 / 50), (1 - 1 / 40, 2 - 2 / 50)  # bin centres
        data = [ind.clamp(lo[0], hi[0]), theta.clamp(lo[1], hi[1]).expand(N, -1)]
        hist2d = histogram2d(torch.stack([d.flatten() for d in data]), (40, 50), ((-1, 1), (-2, 2)))
        return {
            "Loss": loss(theta, X, y).item(),
            "GradNorm": [g[i : i + s].norm().item() for i, s in zip(starts, sizes)],
            "HessTrace": [H.diagonal()[i : i + s].sum().item() for i, s in zip(starts, sizes)],
            "HessTraceGGN": [ggn_diag[i : i + s].sum().item() for i, s in zip(starts, sizes)],
            "TICDiag": (N * G.square().sum(0) / (H.diagonal() + 1e-7)).sum().item(),
            "NormTest": ((N**2 * G.square().sum() - N * g2) / (N - 1) / N / g2).sqrt().item(),
            "InnerTest": (((proj**2).sum() - N * g2**2) / (N - 1) / N / g2**2).sqrt().item(),
            "OrthoTest": (
                (N**2 * dot.diagonal().sum() - (proj**2 / g2).sum()) / (N - 1) / N / g2
            ).sqrt().item(),
            "HessMaxEV": power_iteration(H, start),
            "GradHist1d": torch.histc(ind.clamp(-2, 2), bins=100, min=-2, max=2).tolist(),
            "GradHist2d": hist2d[0].tolist(),
            "params": [p.flatten().tolist() for p in params.values()],
            "largest |eigenvalue|": eigs[eigs.abs().argmax()].item(),
        }


    def track(arch, use_converter=False):
        model, shape = make(arch)
        model = extend(model, use_converter=use_converter)
        loss_fn = extend(nn.CrossEntropyLoss())
        individual = nn.CrossEntropyLoss(reduction="none")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        quantities = configuration("full")
        if arch == "res":
            quantities += [q(lambda step: True) for q in (HessTraceGGN, HessTraceMC, TICDiagMC)]
        cp = Cockpit(model.parameters(), quantities=quantities)
        data = torch.Generator().manual_seed(1)
        refs = []
        for step in range(3):
            X = torch.randn(N, *shape, generator=data)
            y = torch.randint(0, C, (N,), generator=data)
            opt.zero_grad()
            out = model(X)
            loss = loss_fn(out, y)
            info = {"batch_size": N, "individual_losses": individual(out, y), "loss": loss}
            with cp(step, info={**info, "optimizer": opt}):
                loss.backward(create_graph=cp.create_graph(step))
                rng_state = torch.get_rng_state()  # Cockpit's instruments run after this
            if arch == "res":
                refs.append(references(model, X, y, rng_state))
            opt.step()
        return cp.get_output(), refs


    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value.tolist() if hasattr(value, "tolist") else value


    results = {"backend": backpack.__name__}
    for arch in ARCHS:
        try:
            output, refs = track(arch.split("-")[0], use_converter=arch.endswith("-converter"))
            results[arch] = {"output": plain(output), "references": refs}
        except Exception as error:  # BackPACK on the residual net
            cause = error.__context__ or error  # Cockpit's __exit__ fails after it
            results[arch] = {"error": f"{type(cause).__name__}: {cause}"}
    print(json.dumps(results))
    """
)

#: Cockpit's configuration("full"), by output key.
FULL = {
    "Alpha",
    "Distance",
    "GradHist1d",
    "GradNorm",
    "InnerTest",
    "Loss",
    "NormTest",
    "OrthoTest",
    "UpdateSize",
    "TICDiag",
    "HessTrace",
    "HessMaxEV",
    "GradHist2d",
}
TWO_STEP = {"Alpha", "UpdateSize"}  # known at the step after, so none at the last step
MC = {"HessTraceMC", "TICDiagMC"}  # the added instruments with DiagGGNMC


def run_both(curvext_archs: str, backpack_archs: str) -> tuple[dict, dict]:
    """The script on curvext and on BackPACK, side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, backend, archs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for backend, archs in (("curvext", curvext_archs), ("backpack", backpack_archs))
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    assert results[0]["backend"] == "curvext.compat.backpack"
    assert results[1]["backend"] == "backpack"
    return results[0], results[1]


def leaves(value):
    """The numbers in a nested output, in order."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in leaves(value[key])]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    return [value]


def rel_error(ours, theirs) -> float:
    """The largest elementwise relative difference."""
    a, b = leaves(ours), leaves(theirs)
    assert len(a) == len(b) and all(isinstance(x, (int, float)) for x in a + b), (ours, theirs)
    return max((abs(x - y) / max(abs(x), abs(y)) if x != y else 0.0) for x, y in zip(a, b))


def test_full_configuration_matches_backpack():
    ours, theirs = run_both("mlp,cnn", "mlp,cnn")
    for arch in ("mlp", "cnn"):
        assert "error" not in ours[arch] and "error" not in theirs[arch], (ours[arch], theirs[arch])
        out, ref = ours[arch]["output"], theirs[arch]["output"]
        assert set(out) == set(ref) == {"0", "1", "2"}
        for step in out:
            expected = FULL - TWO_STEP if step == "2" else FULL
            assert set(out[step]) == set(ref[step]) == expected, step
            for name in expected:
                assert rel_error(out[step][name], ref[step][name]) <= 1e-6, (arch, step, name)


def test_residual_network_runs_on_curvext_and_not_on_backpack():
    ours, theirs = run_both("res-converter", "res,res-converter")
    for arch in ("res", "res-converter"):  # the first module BackPACK does not know
        error = theirs[arch].get("error", "")
        assert error.startswith("NotImplementedError"), theirs[arch]
        assert "does not have an extension for Module" in error, error

    out, refs = ours["res-converter"]["output"], ours["res-converter"]["references"]
    assert set(out) == {"0", "1", "2"}
    params = [ref.pop("params") for ref in refs]  # each step's, before its update
    for step, ref in enumerate(refs):
        got = out[str(step)]
        assert set(got) == FULL - (TWO_STEP if step == 2 else set()) | MC | {"HessTraceGGN"}
        ref.pop("largest |eigenvalue|")  # Cockpit's power iteration may stop short of it
        for name, expected in ref.items():
            value = got[name]["hist"] if name.startswith("GradHist") else got[name]
            assert rel_error(value, expected) <= 1e-6, (step, name, value, expected)
        distance = [math.dist(a, b) for a, b in zip(params[step], params[0])]
        assert rel_error(got["Distance"], distance) <= 1e-6
        if step < 2:
            update = [math.dist(a, b) for a, b in zip(params[step + 1], params[step])]
            assert rel_error(got["UpdateSize"], update) <= 1e-6
            assert math.isfinite(got["Alpha"])
        # the Monte-Carlo ones: one value per parameter tensor, finite and positive
        assert len(got["HessTraceMC"]) == len(got["HessTrace"]) == 8
        assert all(math.isfinite(x) and x >= 0 for x in got["HessTraceMC"])
        assert math.isfinite(got["TICDiagMC"]) and got["TICDiagMC"] > 0


def test_example_cockpit_full(tmp_path):
    """``examples/cockpit_full.py`` runs and prints one finite row per step."""
    pytest.importorskip("sklearn")
    example = Path(__file__).resolve().parents[1] / "examples" / "cockpit_full.py"
    completed = subprocess.run(
        [sys.executable, str(example), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [row for row in map(str.split, completed.stdout.splitlines()) if len(row) == 8]
    assert [row[0] for row in rows] == ["0", "1", "2"], completed.stdout  # the table's rows
    assert all(math.isfinite(float(x)) for row in rows for x in row[1:-1]), completed.stdout
    assert rows[-1][-1] == "nan" and math.isfinite(float(rows[0][-1]))  # α: one step later
    assert "3 steps with Cockpit's full configuration" in completed.stdout
