"""Test configuration shared by the whole suite.

* float64 by default: the dense references and curvext results are compared
  with tight tolerances, which only float64 supports.
* vmap's slow fallback (an op without a batching rule inside the batched
  backward) is an error, so that performance regressions are seen
  (a known trap of the batched backward).
* one intra-op thread per process: the suite runs under ``pytest -n 2`` and
  the tensors are tiny, so extra threads only cost synchronisation.
"""

import pytest
import torch

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "error:There is a performance drop:UserWarning")
    config.addinivalue_line(
        "markers", "slow: a longer statistical test (still part of the default run)"
    )


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Every test starts from the same dtype and global seed."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
