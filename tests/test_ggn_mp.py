"""``GGNMP``: ``p.ggnmp(M)`` against the dense GGN block of every parameter.

The zoo (``tests/cases.py``: residual, convolutional, transposed, sequence,
tied, normalised, every loss) with its dense float64 reference
(``DenseReference.block``: ``J_pᵀ H J_p`` from reverse-mode Jacobians and
PyTorch's loss Hessian, never curvext): the product with random matrices
``[V, *p.shape]`` and with one vector ``p.shape``. MC: the same identity holds
for the MC GGN that ``SqrtGGN(mc_samples=M)`` of the same draw gives.
"""

import pytest
import torch

from curvext.extensions import GGNMP, SqrtGGN
from tests.cases import (
    CASES,
    SINGLE_POSITION_CASES,
    assert_close,
    dense_reference,
    run_case,
    trainable,
)


@pytest.mark.parametrize("case", CASES + SINGLE_POSITION_CASES, ids=str)
def test_products_with_the_ggn_blocks(case):
    reference = dense_reference(case.name)
    params = trainable(run_case(case, GGNMP()))
    generator = torch.Generator().manual_seed(0)
    for name, param in params.items():
        block = reference.block(name)
        matrix = torch.randn(3, *param.shape, generator=generator, dtype=block.dtype)
        expected = (matrix.reshape(3, -1) @ block).reshape(matrix.shape)  # block symmetric
        assert_close(param.ggnmp(matrix), expected, msg=f"{case.name}: {name}")
        assert_close(param.ggnmp(matrix[0]), expected[0], msg=f"{case.name}: {name} vector")


def test_mc_products_match_the_mc_square_root_of_the_same_draw():
    case = CASES[0]
    torch.manual_seed(3)
    params = trainable(run_case(case, GGNMP(mc_samples=4), SqrtGGN(mc_samples=4)))
    for name, param in params.items():
        vectors = param.sqrt_ggn.flatten(0, 1).flatten(1)  # [M N, P]
        matrix = torch.randn(2, param.numel(), dtype=vectors.dtype)
        expected = matrix @ vectors.T @ vectors
        assert_close(param.ggnmp(matrix.reshape(2, *param.shape)).reshape(2, -1), expected)


def test_wrong_shape_names_the_parameter():
    params = trainable(run_case(CASES[0], GGNMP()))
    param = next(iter(params.values()))
    with pytest.raises(ValueError, match=r"p.ggnmp of .*expected a tensor \[V, "):
        param.ggnmp(torch.zeros(2, param.numel() + 1))


def test_the_stored_function_keeps_no_graph():
    """``p.ggnmp`` keeps the layer's inputs, not the autograd graph of the pass."""
    import gc
    import weakref

    from torch import nn

    from curvext import backpack, extend

    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    loss_fn = extend(nn.CrossEntropyLoss())
    hidden = model[1](model[0](torch.randn(5, 3)))  # the input of the last Linear call
    output = model[2](hidden)

    class Probe:  # autograd nodes take no weak references: a marker in one's metadata
        pass

    probe = Probe()
    hidden.grad_fn.metadata["probe"] = probe
    node = weakref.ref(probe)
    del probe
    loss = loss_fn(output, torch.tensor([0, 1, 1, 0, 1]))
    with backpack(GGNMP()):
        loss.backward()
    del output, loss, hidden
    gc.collect()
    assert node() is None
    assert model[0].weight.ggnmp(torch.ones(4, 3)).shape == (4, 3)
