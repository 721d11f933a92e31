#!/bin/sh
# Install the bench's peers (supervisord, circus) into their own venv,
# bench/fleet/.venv-peers, so they never mix with fastorch's environment.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-peers"
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -r "$here/requirements-peers.txt"
"$venv/bin/python" -c "import supervisor.supervisord, circus.arbiter"
"$venv/bin/supervisord" --version
"$venv/bin/circusd" --version
