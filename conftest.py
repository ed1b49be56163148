"""Collection of the doctests in curvext/: examples that need an optional
package that is not installed are left out or skipped (the `test` extra has
them all; `pip install -e ".[test-core]"` collects and passes the rest)."""

import importlib.util

import pytest

collect_ignore = [
    path
    for path, package in [("curvext/integrations/laplace.py", "laplace")]
    if importlib.util.find_spec(package) is None
]

#: Doctests that run SciPy (the `operators` extra).
NEEDS_SCIPY = {
    "curvext.linear.scipy_operator",
    "curvext.linear.LinearOperator.to_scipy",
    "curvext.linalg.inverse.LSMRInverse",
}


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("scipy") is not None:
        return
    skip = pytest.mark.skip(reason="needs scipy: pip install -e '.[operators]'")
    for item in items:
        if item.name in NEEDS_SCIPY:
            item.add_marker(skip)
