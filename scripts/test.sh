#!/usr/bin/env bash
# One command: set up (editable install with test extras) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
ruff check .
ruff format --check .
python -m pytest -q tests "$@"
