#!/usr/bin/env bash
# Shared by deploy/run-node.sh and tests/run.sh: make sure Debian packages and
# a virtual environment (.venv) with the node installed exist.
#   bootstrap_debs PKG...   install missing Debian packages (sudo when not root)
#   bootstrap_venv EXTRAS   create .venv if needed and pip install -e ".[EXTRAS]"
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

bootstrap_debs() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

bootstrap_venv() {
  local extras="${1:-}" python="${PYTHON:-python3}" venv="${VENV:-.venv}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: Python >= 3.11 is needed ($python is $("$python" --version 2>&1))" >&2
    exit 1
  fi
  if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    bootstrap_debs python3-venv
  fi
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  local spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  # Reinstall only when the declared dependencies changed.
  local stamp="$venv/.installed-$extras"
  if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$spec"
    touch "$stamp"
  fi
}
