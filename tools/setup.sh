#!/usr/bin/env bash
# Set up a development environment on a fresh machine: a virtualenv in .venv with every
# extra, torch pinned to the CPU wheel first (see constraints.txt), and a redis-server
# binary for the tests (Debian package) when it is missing and we may install it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    (sudo apt-get install -y -q redis-server || (sudo apt-get update -q && sudo apt-get install -y -q redis-server)) >/dev/null
  else
    if [ -n "${CI:-}" ]; then
      echo "error: redis-server is not installed and cannot be (not root, no sudo); CI needs it" >&2
      exit 1
    fi
    echo "warning: redis-server is not installed; the Redis tests will be skipped (and fail under CI=true)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
touch .venv/.ferry-setup
echo "environment ready in .venv"
