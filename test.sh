#!/usr/bin/env bash
# Sets everything up (first run only) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
