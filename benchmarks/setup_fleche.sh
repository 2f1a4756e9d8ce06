#!/usr/bin/env bash
# The `fleche` package, for the remote benchmarks' comparison, in a virtualenv
# of its own:   bash benchmarks/setup_fleche.sh   (prints the venv's python)
#
# fleche is what we measure against, never our dependency: it needs Python
# >= 3.11 and pulls pandas, so it lives in .bench-state/fleche-venv, and the
# benchmarks run its side of the work there (benchmarks/fleche_driver.py).
# Run again, it reuses the venv when fleche already imports in it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLECHE_BENCH_VENV:-$ROOT/.bench-state/fleche-venv}"
SPEC="${FLECHE_BENCH_SPEC:-fleche>=0.22}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import fleche.remote, cloudpickle' >/dev/null 2>&1; then
    echo "$VENV/bin/python"
    exit 0
fi

# the newest Python >= 3.11 we can find: pyenv's, then the system's
base=""
for minor in 3.13 3.12 3.11; do
    cand="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$minor".*/bin/python"$minor" 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -z "$cand" ] && cand="$(command -v python"$minor" || true)"
    if [ -n "$cand" ] && [ -x "$cand" ]; then base="$cand"; break; fi
done
if [ -z "$base" ]; then
    echo "setup_fleche.sh: no Python >= 3.11 found (pyenv or PATH); fleche needs one" >&2
    exit 1
fi

mkdir -p "$(dirname "$VENV")"
"$base" -m venv --clear "$VENV" >&2
"$VENV/bin/python" -m pip install -q "$SPEC" cloudpickle numpy >&2
"$VENV/bin/python" -c 'import fleche.remote, cloudpickle' >&2
echo "$VENV/bin/python"
