"""Weights keep their dtype through every loading path; max_model_len defaults to
the model's own limit, capped by the KV pool."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine.config import EngineConfig
from ridgeline.engine.engine import Engine, SamplingParams
from ridgeline.model import checkpoint
from ridgeline.engine import loading
from ridgeline.model import transformer as transformer_lib
from tests.hf_tiny import SMALL, save_random


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("bf16")
  save_random(path, transformers.LlamaForCausalLM,
              transformers.LlamaConfig(**SMALL, max_position_embeddings=512),
              dtype=torch.bfloat16)
  return path


def _dtypes(model):
  params = transformer_lib.to_params(model)
  return {jnp.dtype(a.dtype) for a in [params["embed"], *params["layers"][0].values()]}


def test_bf16_directory_loads_as_bf16_everywhere(bf16_dir, tmp_path):
  model, tok = loading.load_model(str(bf16_dir))  # --checkpoint DIR
  assert model.config.param_dtype == model.config.compute_dtype == "bfloat16"
  assert _dtypes(model) == {jnp.dtype(jnp.bfloat16)}
  assert tok is not None

  ckpt = tmp_path / "ckpt"
  loading.convert(bf16_dir, ckpt)  # convert_checkpoint.py's default
  assert checkpoint.load_config(ckpt).param_dtype == "bfloat16"
  restored, _ = loading.load_model(str(ckpt))
  assert _dtypes(restored) == {jnp.dtype(jnp.bfloat16)}

  engine = Engine.from_checkpoint(str(bf16_dir), EngineConfig(num_pages=32, page_size=16))
  assert engine.model_config.param_dtype == "bfloat16"
  # --dtype still overrides.
  as32, _ = loading.load_model(str(bf16_dir), dtype="float32")
  assert _dtypes(as32) == {jnp.dtype(jnp.float32)}


def test_a_512_token_model_runs_with_default_flags():
  model = transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))
  assert model.config.max_position_embeddings == 512
  engine = Engine(model, None, EngineConfig())
  assert engine.config.max_model_len == 512
  prompt = list(np.random.default_rng(0).integers(1, 500, 500))
  out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=None))[0]
  assert out.error is None and len(out.token_ids) == 12 and out.finish_reason == "length"


def test_default_max_model_len_is_capped_by_the_pool():
  model = transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))
  engine = Engine(model, None, EngineConfig(num_pages=10, page_size=16))
  assert engine.config.max_model_len == 160
  with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
    Engine(model, None, EngineConfig(max_model_len=1024))
  with pytest.raises(ValueError, match="resolves it"):
    EngineConfig().max_pages_per_seq
