"""laplace-torch's own BackPACK backend (``BackPackGGN``, ``BackPackEF``) on
``curvext.compat.backpack.install()``, unchanged.

Its Jacobians run ``with backpack(BatchGrad()): out[:, i].sum().backward()``
(a backward without an extended loss) and its ``full``/``diag`` curvatures
``DiagGGNExact``/``SqrtGGNExact``/``SumGradSquared``; all are compared with
references that never touch curvext: ``torch.func.jacrev`` Jacobians and the
GGN ``Jᵀ H J`` with PyTorch's loss Hessian. In a fresh process, since
``install()`` must run before anything imports ``backpack``.
"""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("laplace")

SCRIPT = textwrap.dedent(
    """
    import curvext.compat.backpack as compat
    compat.install()

    import torch
    from torch import nn
    from torch.func import functional_call, jacrev
    from laplace.curvature import BackPackEF, BackPackGGN

    torch.manual_seed(0)
    N, C = 6, 4
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)).double()
    model.output_size = C  # set by laplace's Laplace classes
    X = torch.randn(N, 3, dtype=torch.float64)
    y = torch.randint(0, C, (N,))

    params = dict(model.named_parameters())
    jac = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    J = torch.cat([v.reshape(N, C, -1) for v in jac.values()], -1)  # [N, C, P]
    logits = model(X).detach()
    H = torch.stack([
        torch.autograd.functional.hessian(
            lambda f: nn.functional.cross_entropy(f[None], y[n : n + 1], reduction="sum"),
            logits[n],
        )
        for n in range(N)
    ])  # [N, C, C]
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, H, J)  # laplace's loss: reduction="sum"

    backend = BackPackGGN(model, "classification")
    Js, f = backend.jacobians(X)
    assert Js.shape == J.shape and torch.allclose(f, logits)
    print("jacobians", (Js - J).abs().max().item())
    _, full = backend.full(X, y)
    print("full", ((full - ggn).abs().max() / ggn.abs().max()).item())
    _, diag = backend.diag(X, y)
    print("diag", ((diag - ggn.diagonal()).abs().max() / ggn.abs().max()).item())

    grads = torch.stack([
        torch.cat([
            g.flatten()
            for g in torch.autograd.grad(
                nn.functional.cross_entropy(model(X[n : n + 1]), y[n : n + 1], reduction="sum"),
                list(model.parameters()),
            )
        ])
        for n in range(N)
    ])
    _, ef_diag = BackPackEF(model, "classification").diag(X, y)
    expected = grads.square().sum(0)
    print("ef", ((ef_diag - expected).abs().max() / expected.abs().max()).item())
    """
)


def test_laplace_backpack_backend_runs_unchanged_on_curvext():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = dict(line.split() for line in result.stdout.splitlines())
    for key in ("jacobians", "full", "diag", "ef"):
        assert float(errors[key]) < 1e-12, (key, errors[key])
