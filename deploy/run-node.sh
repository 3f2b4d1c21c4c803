#!/usr/bin/env bash
# Install the node into .venv on first use, then run `pacs-ai-node ARGS...`.
# With no arguments: `pacs-ai-node serve` on the embedded default
# (AE title AINODE, port 11112, data in ./var, model from onnx_models/).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bootstrap.sh
bootstrap_venv ""
if [ "$#" -eq 0 ]; then set -- serve; fi
exec .venv/bin/pacs-ai-node "$@"
