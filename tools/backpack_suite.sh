#!/usr/bin/env bash
# Run BackPACK 1.7.1's own test suite (its test/ tree minus test/core/, which
# tests BackPACK's internal derivative classes) against curvext.compat.backpack.
#
# A developer check, not part of CI: it downloads BackPACK's source
# distribution (for its tests) into a temporary folder and runs them with
# `import backpack` redirected to curvext (curvext.compat.backpack.install()).
# Run it in the development environment (`pip install -e ".[test]"`).
#
#   bash tools/backpack_suite.sh            # BackPACK's default selection
#   bash tools/backpack_suite.sh --run-optional-tests=montecarlo   # + MC tests
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download backpack-for-pytorch==1.7.1 --no-binary :all: --no-deps -q -d "$work"
tar xzf "$work"/backpack_for_pytorch-1.7.1.tar.gz -C "$work"
# BackPACK's test requirements (pytest-optional-tests 0.1.3 ships no module)
pip install -q "pytorch-memlab" "pytest-optional-tests==0.1.1"
cat > "$work/curvext_install.py" <<'PLUGIN'
import curvext.compat.backpack

curvext.compat.backpack.install()
PLUGIN
cd "$work/backpack_for_pytorch-1.7.1"
# two processes on disjoint folders (pytest-xdist cannot: BackPACK's test ids
# differ between workers)
PYTHONPATH="$work" python -m pytest -p curvext_install test/extensions/secondorder \
    -q -p no:cacheprovider -rfE "$@" > "$work/second_order.log" 2>&1 &
PYTHONPATH="$work" python -m pytest -p curvext_install test --ignore=test/core \
    --ignore=test/extensions/secondorder -q -p no:cacheprovider -rfE "$@" \
    > "$work/rest.log" 2>&1 || true
wait || true
grep -h -E "^(FAILED|ERROR)" "$work/second_order.log" "$work/rest.log" | sed -E 's/\[.*//' \
    | sort | uniq -c | sort -rn
tail -n 1 "$work/second_order.log" "$work/rest.log"
