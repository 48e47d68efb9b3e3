"""Test-wide setup: float64 references (`jax_enable_x64`), 8 CPU devices (`jax_num_cpu_devices`,
for the sharding and pipeline tests), a reproducible per-test `rng`, markers.

With x64 enabled globally, every test array must be created with an explicit dtype.
"""

from __future__ import annotations

import gc
import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_num_cpu_devices", 8)   # 8 fake CPU devices for the sharding tests


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` skip themselves unless JAX's default backend is a GPU."""
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU (jax.default_backend() != 'gpu')")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_functions():
  """Drops JAX's compilation caches after each test module: a long-lived xdist worker otherwise
  accumulates every module's executables (CI has 24 GB for two workers)."""
  yield
  jax.clear_caches()
  gc.collect()


def _seed(item) -> int:
  return zlib.crc32(item.nodeid.encode())


@pytest.fixture
def rng(request) -> np.random.Generator:
  """`np.random.default_rng(seed)`, seed = crc32 of the test node id (stable across runs)."""
  return np.random.default_rng(_seed(request.node))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if report.failed and "rng" in getattr(item, "fixturenames", ()):
    report.sections.append(("rng", f"np.random.default_rng({_seed(item)})"))
  return report


@pytest.fixture
def dla_op_record(monkeypatch):
  """Spies on the layers' `dla_attention`: the returned dict's "aux" holds the `DLADecisions` of
  the latest call (read it from inside the same trace)."""
  from dlax.layers import multistate
  op, record = multistate.dla_attention, {}

  def spy(*args, **kwargs):
    outputs = op(*args, **kwargs)
    record["aux"] = outputs[-1]
    return outputs

  monkeypatch.setattr(multistate, "dla_attention", spy)
  return record
