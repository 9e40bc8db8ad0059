#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite: lint, layering (import-linter), unit,
# pipeline, integration and browser tests. Pass pytest arguments to narrow it, e.g.
# `scripts/test.sh -m "not slow"`.
set -euo pipefail
export AGILE_WITH_BROWSER=1
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export AGILE_HOME="$(mktemp -d)/agile"   # tests never touch your data directory
echo "==> ruff"
ruff check .
echo "==> import-linter (layers, pure library, no cycles: pyproject.toml [tool.importlinter])"
lint-imports --no-cache --no-logo
echo "==> pytest"
python -m pytest "$@"
