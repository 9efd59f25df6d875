#!/usr/bin/env bash
# The pure-Python needs of PyTorch's test_transformers.py (expecttest, hypothesis and its
# dependencies) as a site folder for PYTHONPATH, with hypothesis's native module for this
# machine's Python and for the GPU machine's (3.12), so that the folder can travel to the GPU
# machine (which has no registry) with `carry`. The test file itself is PyTorch's
# test/test_transformers.py (not part of this repository), read from pytorch/pytorch.
#   bash scripts/suite_site.sh [FOLDER]     (default build/suite/site)
set -euo pipefail
site=${1:-build/suite/site}
python=${PYTHON:-python3}
hypothesis="hypothesis==6.170.17"
mkdir -p "$site"
"$python" -m pip install -q --disable-pip-version-check --no-deps --target "$site" expecttest "$hypothesis" attrs \
  sortedcontainers
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
"$python" -m pip download -q --disable-pip-version-check --no-deps --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: -d "$download" "$hypothesis"
"$python" -m zipfile -e "$download"/hypothesis-*.whl "$download/unpacked"
cp "$download"/unpacked/hypothesis/_native.cpython-312-*.so "$site/hypothesis/"
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "suite site: $site ($(du -sh "$site" | cut -f1)); native modules: $(ls "$site"/hypothesis/_native.*.so | xargs -n1 basename | tr '\n' ' ')"
