"""Watch the top of the GGN spectrum while training on scikit-learn's digits.

Trains an MLP on the 8×8 digits that ship with scikit-learn (no download)
with SGD and logs, every few steps, the five largest GGN eigenvalues of the
mini-batch, the GGN's trace and the gradient noise scale
(:class:`curvext.monitor.EigenLogger`). The records go to
``eigenvalues.jsonl`` and the plot to ``eigenvalues.png`` (or the paths
given). With this learning rate the largest eigenvalue (the "sharpness") of
the mini-batch GGN first rises, then hovers around the stability limit
``2 / lr`` of gradient descent, as Cohen et al. (2021) describe for the
full-batch Hessian ("edge of stability"); the printout shows both, and the
plot (``logger.plot(path, lr=...)``) draws the eigenvalues against the dashed line ``2 / lr``
above the trace and the noise scale.

Run: ``python examples/monitor_digits.py [eigenvalues.png]``; about 10 s on
two CPU cores. Needs scikit-learn and matplotlib
(``pip install -e ".[examples,monitor]"``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from curvext import backpack, extend
from curvext.monitor import EigenLogger


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plot", nargs="?", default="eigenvalues.png", help="image to write")
    parser.add_argument("--log", default=None, help="records (default: next to the plot, .jsonl)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--every", type=int, default=5, help="log every n-th step")
    args = parser.parse_args(argv)
    log_path = args.log or os.path.splitext(args.plot)[0] + ".jsonl"

    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train_X, train_y, test_X, test_y = X[:1500], y[:1500], X[1500:], y[1500:]

    model = extend(
        nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    )
    loss_fn = extend(nn.CrossEntropyLoss())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # exact GGN: a Gram matrix of N·(C−1) = 576 rows per logged batch of 64
    logger = EigenLogger(log_path, top_k=5, every=args.every)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(train_X)).split(64):
            optimizer.zero_grad()
            loss = loss_fn(model(train_X[batch]), train_y[batch])
            with backpack(*logger.extensions()):
                loss.backward()
            records = logger.step(loss)
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(test_X).argmax(1) == test_y).float().mean().item()
        last = logger.records[-1]
        print(
            f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}, "
            f"λ_max {last['top_eigvals'][0]:.3f} (2/lr = {2 / args.lr:.1f}), "
            f"trace {last['trace']:.2f}, noise scale {last['noise_scale']:.0f}"
        )
    logger.close()
    print(
        f"{logger.num_steps} steps, {len(logger.records)} logged, "
        f"{time.perf_counter() - start:.1f} s; records in {log_path}"
    )
    del records

    try:
        logger.plot(args.plot, lr=args.lr)  # 2/lr: the stability limit of gradient descent
    except ImportError as error:
        print(f"not plotting: {error}")
        return logger.records
    print(f"plot in {args.plot}")
    return logger.records


if __name__ == "__main__":
    main()
