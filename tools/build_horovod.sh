#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (its last release) for backend=horovod, CPU/Gloo, into the
# given Python's environment:   tools/build_horovod.sh [PYTHON] [WHEEL_CACHE_DIR]
#
# 0.28.1 does not build against PyTorch >= 2.1 as released: its CMake files ask for C++14 and
# PyTorch's headers need C++17. This script builds the release source with CMAKE_CXX_STANDARD 17
# in CMakeLists.txt and horovod/torch/CMakeLists.txt (about 3 minutes on 2 cores), with PyTorch
# and Gloo only (no TensorFlow, MXNet or MPI). The wheel is kept in WHEEL_CACHE_DIR, one per
# (torch version, Python tag), and reused by the next run on the same machine.
set -euo pipefail
PY="${1:-python3}"
CACHE="${2:-${XDG_CACHE_HOME:-$HOME/.cache}/dqt/horovod}"
VERSION=0.28.1
tag=$("$PY" -c "import sys, torch; print(f'torch{torch.__version__}-cp{sys.version_info.major}{sys.version_info.minor}')")
dir="$CACHE/$tag"
wheel=$(ls "$dir"/horovod-$VERSION-*.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
  for tool in cmake g++ make; do
    if ! command -v "$tool" >/dev/null; then
      if [[ $tool == cmake ]]; then "$PY" -m pip install --quiet cmake; continue; fi
      echo "build_horovod: '$tool' is needed to build Horovod (apt-get install build-essential)" >&2
      exit 1
    fi
  done
  export PATH="$(dirname "$PY"):$PATH"  # a pip-installed cmake
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
  tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
  src="$work/horovod-$VERSION"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "build_horovod: $f has no C++14 line to patch" >&2; exit 1; }
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  done
  # build requirements of horovod's setup.py (no build isolation: it must see this torch)
  "$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
  echo "build_horovod: building Horovod $VERSION against $tag (a few minutes)" >&2
  mkdir -p "$dir"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/wheel" "$src"
  mv "$work"/wheel/horovod-$VERSION-*.whl "$dir/"  # only a finished wheel enters the cache
  wheel=$(ls "$dir"/horovod-$VERSION-*.whl | head -1)
fi
"$PY" -m pip install --quiet "$wheel"
"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'Horovod built without Gloo'; print('horovod', '$VERSION', 'with gloo: ok')"
