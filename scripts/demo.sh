#!/usr/bin/env bash
# The demo of fleche-remote:   bash scripts/demo.sh
#
# Sets up what the demo needs on a fresh Debian machine (OpenSSH for the
# private sshd that plays the cluster, a .venv with fleche-remote), then
# runs `fleche-remote demo` (arguments go to it: bash scripts/demo.sh -n 1 2 3 4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1; then
    echo "==> installing openssh-server and openssh-client with apt-get"
    as_root apt-get update -qq
    # keep apt from starting a system sshd on every interface
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq openssh-server openssh-client
    [ -n "$policy_added" ] && as_root rm -f /usr/sbin/policy-rc.d
fi

PY="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13.*/bin/python3.13 2>/dev/null | sort -V | tail -n 1 || true)"
[ -n "$PY" ] || PY="$(command -v python3)"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $PY"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import fleche_remote, numpy, sqlalchemy, tqdm" >/dev/null 2>&1; then
    echo "==> installing fleche-remote into .venv"
    .venv/bin/pip install -q -e '.[sql,numpy]'
fi
echo "==> running fleche-remote demo"
exec .venv/bin/python -m fleche_remote demo "$@"
