#!/usr/bin/env bash
# Regenerate the images' hash-locked requirements, deploy/docker/requirements-*.lock:
#   tools/lock-images.sh
# Each lock is resolved for the images' Python (3.12 on Linux) from pyproject.toml, with
# constraints.txt and deploy/docker/image-constraints.txt, and carries every file's sha256;
# the Dockerfiles install it with `pip install --require-hashes`. Uses uv (`uv pip compile
# --generate-hashes`): the one on PATH, else a throwaway copy installed from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$(command -v uv || true)}
if [ -z "$UV" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q uv
  UV="$tmp/venv/bin/uv"
fi
lock() {
  local out=$1
  shift
  "$UV" pip compile --quiet --generate-hashes --python-version 3.12 --python-platform linux \
    --custom-compile-command "tools/lock-images.sh" \
    -c constraints.txt -c deploy/docker/image-constraints.txt \
    "$@" deploy/docker/build.in -o "deploy/docker/$out"
}
lock requirements-gateway.lock pyproject.toml --extra gateway
lock requirements-worker.lock pyproject.toml --extra worker
lock requirements-worker-cuda.lock pyproject.toml deploy/docker/worker-cuda.in
echo "locked: deploy/docker/requirements-{gateway,worker,worker-cuda}.lock"
