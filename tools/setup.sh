#!/usr/bin/env bash
# Set up a development environment on a fresh machine: a virtualenv in .venv with every
# extra, torch pinned to the CPU wheel first (see constraints.txt), and the Debian packages the
# tests need (redis-server, curl) when they are missing and we may install them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Debian packages the tests use: redis-server (it also runs as a sentinel) and curl (the docs'
# runnable HTTP examples).
missing=()
for pkg in redis-server curl; do command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q "${missing[@]}" || (apt-get update -q && apt-get install -y -q "${missing[@]}")) >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    (sudo apt-get install -y -q "${missing[@]}" || (sudo apt-get update -q && sudo apt-get install -y -q "${missing[@]}")) >/dev/null
  else
    if [ -n "${CI:-}" ]; then
      echo "error: ${missing[*]} not installed and cannot be (not root, no sudo); CI needs them" >&2
      exit 1
    fi
    echo "warning: ${missing[*]} not installed; the tests needing them are skipped (and fail under CI=true)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
touch .venv/.ferry-setup
echo "environment ready in .venv"
