#!/usr/bin/env bash
# Sets everything up (first run only) and runs the default offline benchmark (configs/micro.yaml).
# Extra arguments go to `datafilter bench`, e.g. `bash run.sh --seeds 0 1 2` or `bash run.sh configs/micro.yaml`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
exec .venv/bin/datafilter bench "$@"
