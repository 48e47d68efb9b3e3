"""The kernel tests share the op tests' helpers (`tests/ops/_helpers.py`)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "ops"))
