#!/usr/bin/env bash
# The one test command (README): lint, format check, strict typing, then every test, slow ones too.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
python3 -m pytest -q -p no:cacheprovider "$@"
