"""GGNEigen's eigenvalues against ViViT's on an MLP (where ViViT runs).

ViViT 1.0.0 calls ``Tensor.symeig``, which PyTorch 2.x keeps only as a stub
that raises; the test patches it with ``torch.linalg.eigh`` as PyTorch's
deprecation message prescribes, for the duration of the test only.
"""

import copy

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import GGNEigen

vivit_eigh = pytest.importorskip("vivit.linalg.eigh")
bp = pytest.importorskip("backpack")


def _symeig(self, eigenvectors=False, upper=True):
    evals, evecs = torch.linalg.eigh(self, UPLO="U" if upper else "L")
    return (evals, evecs) if eigenvectors else (evals, evecs.new_empty(0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_top_eigenvalues_match_vivit(monkeypatch, reduction):
    monkeypatch.setattr(torch.Tensor, "symeig", _symeig, raising=False)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    X, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))

    ours = extend(copy.deepcopy(base))
    loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
    ext = GGNEigen(top_k=5)
    with backpack(ext):
        loss_fn(ours(X), y).backward()
    our_evals = ext.result(0)[0]

    theirs = bp.extend(copy.deepcopy(base))
    their_loss_fn = bp.extend(nn.CrossEntropyLoss(reduction=reduction))
    computation = vivit_eigh.EighComputation()
    group = {
        "params": list(theirs.parameters()),
        "criterion": lambda evals: list(range(len(evals) - 5, len(evals))),
    }
    with bp.backpack(
        computation.get_extension(),
        extension_hook=computation.get_extension_hook([group]),
    ):
        their_loss_fn(theirs(X), y).backward()
    their_evals, _ = computation.get_result(group)

    # ViViT lists its eigenvalues ascending, curvext largest first
    expected = their_evals.sort(descending=True).values
    torch.testing.assert_close(our_evals, expected, rtol=1e-8, atol=1e-12)
