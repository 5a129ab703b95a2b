#!/usr/bin/env bash
# Install napari-mediffuse with its test extras on a fresh machine.
#
#   bash scripts/install.sh
#
# 1. System packages (Debian/Ubuntu, when run as root or with sudo): a virtual
#    X server and Mesa, so napari's OpenGL canvas works in tests and on
#    headless machines, plus the X/Qt libraries PyQt needs.
# 2. PyTorch: kept if already installed (e.g. your CUDA build); otherwise
#    $MEDIFFUSE_TORCH, the CPU build 2.13.0 by default.
# 3. The project in editable mode with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libglib2.0-0 libfontconfig1
  libdbus-1-3 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
  libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0
  libxcb-cursor0)

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
else
  echo "no apt-get: install Xvfb and Mesa (OpenGL) with your system's package manager" >&2
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "${MEDIFFUSE_TORCH:-torch==2.13.0}"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
echo "napari-mediffuse installed; run the tests with: python -m pytest"
