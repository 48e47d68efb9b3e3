#!/usr/bin/env bash
# Creates (or refreshes) .venv-torch: a Python 3.11 environment with CPU torch 2.13.0,
# transformers, safetensors and numpy, used only by the PyTorch parity tests
# (tests/torch_parity) through a subprocess. The main environment never gets torch.
# Re-running is cheap: a stamp keyed on this script skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DLAX_TORCH_VENV:-.venv-torch}
stamp="$venv/.dlax-torch-installed"
want=$(sha1sum "$0" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
is311() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; }
py=""
for cand in $(command -v python3.11 2>/dev/null) \
            $(ls -d "$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"/versions/3.11*/bin/python3 2>/dev/null | sort -V); do
  if is311 "$cand"; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "error: the torch parity environment needs Python 3.11 (torch 2.13.0 CPU wheel is" \
       "cp311); none was found on PATH or under pyenv. Install one, e.g. 'pyenv install 3.11'." >&2
  exit 1
fi
echo "dlax: creating $venv with $py ($("$py" --version))" >&2
rm -rf "$venv"
"$py" -m venv "$venv"
# The local CPU wheel, when present, avoids pulling CUDA builds from an index.
torch_spec="torch==2.13.0"
for wheel in ${TORCH_WHEEL_DIR:-/opt/wheels}/torch-2.13.0+cpu-cp311-*.whl; do
  [ -f "$wheel" ] && torch_spec=$wheel
done
"$venv/bin/python" -m pip install -q "$torch_spec" transformers safetensors numpy
"$venv/bin/python" -c 'import torch, transformers; print("dlax: torch", torch.__version__,
                       "transformers", transformers.__version__)' >&2
echo "$want" > "$stamp"
