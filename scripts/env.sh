# Sourced by scripts/*.sh: a Python virtualenv keyed by the locked requirements, under the
# project's cache folder. Creates it from nothing when it is missing (uv from PyPI, then the lock).
set -euo pipefail
MPU_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/mpu-janitor"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION=0.13.9
lock_key=$( { cat "$REPO_ROOT/requirements/test.txt"; python3 --version; } | sha256sum | cut -c1-16)
VENV="$MPU_CACHE/venv-$lock_key"
UV_HOME="$MPU_CACHE/uv-$UV_VERSION"
export UV_CACHE_DIR="$MPU_CACHE/uv-cache"

if [[ ! -x "$UV_HOME/bin/uv" ]]; then
  echo "[env] installing uv $UV_VERSION into $UV_HOME" >&2
  python3 -m venv "$UV_HOME"
  "$UV_HOME/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
if [[ ! -f "$VENV/.complete" ]]; then
  echo "[env] creating $VENV from requirements/test.txt" >&2
  rm -rf "$VENV"
  "$UV_HOME/bin/uv" venv --quiet --python python3 "$VENV"
  "$UV_HOME/bin/uv" pip sync --quiet --python "$VENV/bin/python" "$REPO_ROOT/requirements/test.txt"
  touch "$VENV/.complete"
fi
# The project itself, editable, so this checkout's code is what runs (cheap: no dependencies).
"$UV_HOME/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e "$REPO_ROOT"
export PATH="$VENV/bin:$PATH"
export MPU_JANITOR_BIN_DIR="$MPU_CACHE/bin"
