#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (the oldest such, to match the GPU machines),
# from PATH first, then from pyenv.
# Exits 1 with a clear message when none exists.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for name in python3.12 python3.13 python3.14 python3 python; do
  p=$(command -v "$name" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for p in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "error: dlax needs Python >= 3.12 (JAX 0.11 dropped 3.11), and none was found on PATH" \
     "or under pyenv ($root/versions). Install one, e.g. 'pyenv install 3.12', and retry." >&2
exit 1
