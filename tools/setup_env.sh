#!/usr/bin/env bash
# Create .venv (if missing) and install everything lidar_ptq needs on a CPU-only machine:
# torch, the OpenMMLab stack (mmcv 2.1.0 built from source with ops), spconv (CPU), ONNX, dev tools.
# Idempotent: a stamp file per step makes a second run quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.lidar_ptq_stamps"; mkdir -p "$STAMP"
step() {  # step NAME HASH_INPUT... -- command
  local name=$1; shift
  local key; key=$(cat "$@" 2>/dev/null | sha1sum | cut -c1-12) || key=none
  [ -f "$STAMP/$name.$key" ] && { echo "[setup] $name: up to date"; return 1; }
  return 0
}
done_step() { local name=$1; shift; local key; key=$(cat "$@" 2>/dev/null | sha1sum | cut -c1-12); rm -f "$STAMP/$name".*; touch "$STAMP/$name.$key"; }

if step base requirements/base.txt requirements/dev.txt requirements/export.txt requirements/spconv-cpu.txt; then
  $PIP install -q --upgrade "pip<25" "setuptools<70" wheel
  $PIP install -q -r requirements/base.txt -r requirements/dev.txt -r requirements/export.txt -r requirements/spconv-cpu.txt
  done_step base requirements/base.txt requirements/dev.txt requirements/export.txt requirements/spconv-cpu.txt
fi
if step mmdet3d requirements/mmdet3d.txt; then
  $PIP install -q -r requirements/mmdet3d.txt
  if ! $VENV/bin/python -c "import mmcv, mmcv.ops" 2>/dev/null; then
    # mmcv's setup.py imports pkg_resources, gone from setuptools>=70 (some packages above upgrade it).
    $PIP install -q "setuptools<70"
    echo "[setup] building mmcv 2.1.0 with ops from source (about 15 min on 2 cores; pip caches the wheel)"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP install --no-build-isolation mmcv==2.1.0
  fi
  $PIP install -q --no-deps mmdet==3.3.0 mmdet3d==1.4.0
  done_step mmdet3d requirements/mmdet3d.txt
fi
if step package setup.py; then
  $PIP install -q --no-deps --no-build-isolation -e .
  done_step package setup.py
fi
echo "[setup] done: $($VENV/bin/python -c 'import torch, lidar_ptq; print("torch", torch.__version__, "lidar_ptq", lidar_ptq.__version__)')"
