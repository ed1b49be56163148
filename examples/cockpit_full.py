"""Cockpit's full set of instruments on a residual network, with curvext as its BackPACK.

Cockpit (``pip install cockpit-for-pytorch==1.0.2 "setuptools<81"``) computes
its instruments with BackPACK, which cannot run this network: it stops at the
skip connection (``h + block(h)``). ``curvext.compat.backpack.install()``,
called before anything imports ``backpack``, makes ``import backpack`` give
curvext's BackPACK interface; Cockpit then runs unchanged.

Trains a small residual MLP with SGD on the 8×8 digits that ship with
scikit-learn (no download), with Cockpit's ``configuration("full")`` tracked
at every step, and prints per step: the mini-batch loss, the gradient norm,
the Hessian's trace (``HessTrace``, from the Hessian diagonal), the Hessian
eigenvalue of largest magnitude (``HessMaxEV``, by power iteration), the
θ of the norm and inner-product tests (``NormTest``, ``InnerTest``: the
larger, the noisier the mini-batch gradient) and the step size relative to the
local parabola along the update (``Alpha``: −1 stops at the start of the
parabola, 0 at its minimum, 1 jumps to the other side; known one step later).

Run: ``python examples/cockpit_full.py [--steps 20]``; a few seconds on
two CPU cores. Needs scikit-learn and Cockpit (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import curvext.compat.backpack

curvext.compat.backpack.install()  # before cockpit imports backpack

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

with warnings.catch_warnings():  # cockpit imports pkg_resources (setuptools < 81)
    warnings.simplefilter("ignore")
    from backpack import extend  # noqa: E402 - curvext.compat.backpack.extend
    from cockpit import Cockpit  # noqa: E402
    from cockpit.utils.configuration import configuration  # noqa: E402


class ResidualMLP(nn.Module):
    """Linear → tanh → (Linear → tanh → Linear) + skip → tanh → Linear."""

    def __init__(self, in_features: int = 64, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.block = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + self.block(h)  # the skip connection BackPACK cannot follow
        return self.head(torch.tanh(h))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)

    model = extend(ResidualMLP())
    loss_fn = extend(nn.CrossEntropyLoss())
    individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    cockpit = Cockpit(model.parameters(), quantities=configuration("full"))
    print(f"Cockpit instruments: {', '.join(type(q).__name__ for q in cockpit.quantities)}")
    print(f"{sum(p.numel() for p in model.parameters())} parameters, batches of {args.batch_size}")

    start = time.perf_counter()
    batches = torch.randperm(len(X))[: args.steps * args.batch_size].split(args.batch_size)
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        outputs = model(X[batch])
        loss = loss_fn(outputs, y[batch])
        info = {
            "batch_size": len(batch),
            "individual_losses": individual_loss_fn(outputs, y[batch]),
            "loss": loss,
            "optimizer": optimizer,
        }
        with warnings.catch_warnings():  # HessMaxEV warns if its power iteration runs out
            warnings.simplefilter("ignore")
            with cockpit(step, info=info):
                loss.backward(create_graph=cockpit.create_graph(step))
        optimizer.step()
    seconds = time.perf_counter() - start

    output = cockpit.get_output()
    header = (
        f"{'step':>4s} {'loss':>7s} {'|g|':>7s} {'tr H':>8s} {'λ_max(H)':>9s} "
        f"{'θ norm':>7s} {'θ inner':>7s} {'α':>6s}"
    )
    print(header)
    print("-" * len(header))
    for step in range(len(batches)):
        q = output[step]
        alpha = q.get("Alpha", math.nan)  # needs the next step's loss
        print(
            f"{step:4d} {q['Loss']:7.3f} {math.hypot(*q['GradNorm']):7.4f} "
            f"{sum(q['HessTrace']):8.4f} {q['HessMaxEV']:9.4f} "
            f"{q['NormTest']:7.3f} {q['InnerTest']:7.3f} {alpha:6.2f}"
        )
    hist = output[len(batches) - 1]["GradHist1d"]["hist"]
    print(
        f"{len(batches)} steps with Cockpit's full configuration in {seconds:.1f} s; "
        f"last step's individual-gradient histogram holds {int(hist.sum())} entries "
        f"({args.batch_size} samples × {sum(p.numel() for p in model.parameters())} parameters)"
    )
    return output


if __name__ == "__main__":
    main()
