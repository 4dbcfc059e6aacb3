#!/usr/bin/env bash
# Creates (or refreshes) a virtual environment with seqmodels and its test extras.
# Usage: bash scripts/setup_env.sh [VENV_DIR]
# jax >= 0.11 needs Python >= 3.12: this finds one, or says how to get one.
set -euo pipefail
venv=${1:-.venv}

find_python() {
  local candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  candidates+=(python3.14 python3.13 python3.12 python3 python)
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -rV); do
      candidates+=("$(pyenv root)/versions/$v/bin/python3")
    done
  fi
  for c in "${candidates[@]}"; do
    local exe
    exe=$(command -v "$c" 2>/dev/null) || continue
    # pyenv shims exist for versions that are not selected; only a Python that runs counts.
    if "$exe" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$exe"; return 0
    fi
  done
  return 1
}

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
  py="$venv/bin/python"
else
  base=$(find_python) || {
    echo "error: seqmodels needs Python >= 3.12 (jax >= 0.11 requires it), and none was found." >&2
    echo "fix: install one (e.g. 'pyenv install 3.12' or your OS package python3.12), or set PYTHON=/path/to/python3.12." >&2
    exit 1
  }
  echo "creating $venv with $base ($("$base" --version))"
  rm -rf "$venv"
  "$base" -m venv "$venv"
  py="$venv/bin/python"
fi
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet -e ".[test]"
echo "environment ready: $venv ($("$py" --version))"
