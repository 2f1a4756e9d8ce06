#!/usr/bin/env bash
# The test command of fleche-remote:   bash scripts/test.sh [pytest args...]
#
# On a fresh Debian machine it installs what the tests need, then checks
# everything: ruff, mypy, and the whole pytest suite (arguments go to
# pytest). Run again, it reuses what is already in place.
#
#   * OpenSSH, PostgreSQL, Slurm and munge: the tests start private sshd,
#     postgres, munged/slurmctld/slurmd on 127.0.0.1 and private sockets
#     (fleche_remote/testing/), never the system's.
#   * .venv: the development virtualenv, with every extra (test, bench).
#   * .test-state/py3.9, .test-state/py3.13: bare interpreters with only
#     this checkout and numpy, standing for a cluster's Python, for the
#     cross-version tests (exported as FLECHE_REMOTE_PY39 / _PY313).
#   * .test-state/fleche: the fleche package next to this checkout, for the
#     import-fleche tests (exported as FLECHE_REMOTE_FLECHE_PY).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.test-state"
PYENV_DIR="${PYENV_ROOT:-$HOME/.pyenv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\n==> %s\n' "$*"; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root for: $* (and there is no sudo)" >&2
        return 1
    fi
}

# Newest pyenv interpreter of a minor version (e.g. 3.13), or nothing.
pyenv_python() {
    local found
    found="$(ls -d "$PYENV_DIR"/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$found" ] && [ -x "$found" ] && printf '%s\n' "$found"
    return 0
}

# -- 1. system packages --------------------------------------------------------

BASE_PY="$(pyenv_python 3.13)"
[ -n "$BASE_PY" ] || BASE_PY="$(command -v python3 || true)"

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
{ command -v ssh && command -v ssh-keygen; } >/dev/null 2>&1 || need+=(openssh-client)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# a private single-node Slurm (fleche_remote/testing/slurm.py) for the compute tests
[ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1 || need+=(slurm-wlm)
[ -x /usr/sbin/munged ] || need+=(munge)
if [ -z "$BASE_PY" ]; then
    need+=(python3 python3-venv)
elif ! "$BASE_PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need+=(python3-venv)
fi

if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} with apt-get"
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Keep the packages from starting a system-wide sshd (on every
        # interface), postgres, munged and Slurm: the tests run their own,
        # on loopback and private sockets.
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
    if [ -n "$policy_added" ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
    [ -n "$BASE_PY" ] || BASE_PY="$(command -v python3)"
else
    say "system packages present (sshd, ssh, ssh-keygen, PostgreSQL server, Slurm, munge)"
fi

# A second Unix user, who reads (and, with shared = "group", writes) caches
# written by this one in tests/test_sharing.py.
if ! id -u fleche-peer >/dev/null 2>&1; then
    say "creating the test user fleche-peer"
    as_root useradd --system --user-group --no-create-home --shell /usr/sbin/nologin fleche-peer
fi

# -- 2. virtualenvs ------------------------------------------------------------

# ensure_venv DIR BASE_PYTHON PIP_ARGS...: create DIR if needed and pip
# install PIP_ARGS, unless a stamp says that exact install is already done.
ensure_venv() {
    local dir="$1" base="$2"
    shift 2
    local stamp="$dir/.fleche-test-stamp" want
    want="$("$base" -c 'import sys; print(sys.version.split()[0])')|$(sha256sum pyproject.toml | cut -c1-64)|$*"
    if [ -x "$dir/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] \
        && "$dir/bin/python" -c 'import fleche_remote' >/dev/null 2>&1; then
        say "$dir is up to date ($("$dir/bin/python" -V))"
        return 0
    fi
    if ! "$dir/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "creating $dir from $base"
        rm -rf "$dir"
        "$base" -m venv "$dir"
    fi
    say "installing into $dir: $*"
    "$dir/bin/python" -m pip install -q "$@"
    printf '%s' "$want" >"$stamp"
}

ensure_venv "$ROOT/.venv" "$BASE_PY" -e ".[test,bench]"

mkdir -p "$STATE"
for version in 3.9 3.13; do
    var="FLECHE_REMOTE_PY${version/./}"
    base="$(pyenv_python "$version")"
    if [ -z "$base" ]; then
        # Not fatal here: the other_pythons fixture then fails its tests loudly.
        echo "WARNING: no Python $version under $PYENV_DIR/versions; cross-version tests will fail" >&2
        continue
    fi
    ensure_venv "$STATE/py$version" "$base" -e . numpy
    export "$var=$STATE/py$version/bin/python"
done

# fleche 0.22 (it needs Python >= 3.11 and pulls pandas) beside this checkout,
# for the import-fleche tests (exported as FLECHE_REMOTE_FLECHE_PY).
fleche_base="$(pyenv_python 3.13)"
[ -n "$fleche_base" ] || fleche_base="$BASE_PY"
ensure_venv "$STATE/fleche" "$fleche_base" -e ".[fleche]" "fleche==0.22.2"
export FLECHE_REMOTE_FLECHE_PY="$STATE/fleche/bin/python"

# -- 3. checks -------------------------------------------------------------------

failed=()
say "ruff check fleche_remote tests"
.venv/bin/ruff check fleche_remote tests || failed+=(ruff)
say "mypy fleche_remote"
.venv/bin/mypy fleche_remote || failed+=(mypy)

# --durations: the slowest tests, so that a test that grew slow shows up in
# every run rather than as a suite that is slower for no visible reason.
say "pytest -q --durations=15 $*"
set +e
.venv/bin/python -m pytest -q --durations=15 "$@"
rc=$?
set -e
if [ ${#failed[@]} -gt 0 ]; then
    echo "scripts/test.sh: ${failed[*]} failed (see above)" >&2
    [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
