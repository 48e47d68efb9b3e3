"""Maps the project folders to their import names; all other metadata is in pyproject.toml.

`dlax/` -> `dlax`, `pallas_kernels/` -> `dlax_kernels`, `training/` -> `dlax_training`. The
folders keep the names of the project layout; the import names carry the `dlax` prefix so that
they cannot collide with common top-level packages such as a user's own `training`. The YAML
presets of `configs/` ship inside the wheel as `dlax_training/configs/` (package data), so that
`dlax train --config tiny_demo` works from an installed dlax too.
"""

from setuptools import find_packages, setup

FOLDERS = {"dlax": "dlax", "dlax_kernels": "pallas_kernels", "dlax_training": "training"}


def packages_under(name: str, folder: str) -> list[str]:
  return [name] + [f"{name}.{sub}" for sub in find_packages(folder)]


setup(
    packages=[p for name, folder in FOLDERS.items() for p in packages_under(name, folder)]
    + ["dlax_training.configs"],
    package_dir={**FOLDERS, "dlax_training.configs": "configs"},   # data: pyproject.toml
)
