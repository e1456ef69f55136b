#!/bin/sh
# Build helper for widget.
set -eu
cd "$(dirname "$0")/.."
python3 -m compileall -q src
echo "build ok"
