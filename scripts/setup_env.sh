#!/usr/bin/env bash
# Creates (or refreshes) the project virtual environment .venv with Python >= 3.12 and installs
# dlax in editable mode with its test extra. Re-running is cheap: a stamp keyed on pyproject.toml
# skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DLAX_VENV:-.venv}
stamp="$venv/.dlax-installed"
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py=$(scripts/find_python.sh)
echo "dlax: creating $venv with $py ($("$py" --version))" >&2
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
