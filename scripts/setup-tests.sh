#!/usr/bin/env bash
# Install everything the test suite needs: Python packages from requirements-dev.txt
# and Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium;
# its own browser download is not used).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
# the face mesh's iris model, taken once from PyPI's mediapipe wheel (the tests then run with the network cut)
python -c "import sys; sys.path.insert(0, '.'); from mefacial.mesh import iris_model; iris_model()"
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
