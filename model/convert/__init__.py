"""Foreign checkpoint formats -> (ModelConfig, canonical params)."""

from __future__ import annotations

import json
import os
import pathlib

from ridgeline.model.config import ModelConfig
from ridgeline.model.params import Params


def load_foreign(path: str | os.PathLike, dtype: str | None = None,
                 quantize: str | None = None) -> tuple[ModelConfig, Params]:
  """A GGUF file or a Hugging Face model directory, chosen by what `path` is.

  dtype None keeps the weights' own dtype (see each converter). `quantize`: the
  mode the caller will quantize to; a GGUF file already in that format (Q8_0 for
  int8, Q4_0 for int4) keeps its own blocks. A Hugging Face fp8 checkpoint always
  loads as fp8."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if path.is_file() and path.suffix == ".gguf":
    from ridgeline.model.convert.gguf import load_gguf
    return load_gguf(path, dtype, keep_quantized=quantize)
  if path.is_dir():
    incomplete = _incomplete_ridgeline_checkpoint(path)
    if incomplete:
      raise ValueError(incomplete)
  if path.is_dir() and (path / "config.json").exists():
    from ridgeline.model.convert.hf import load_hf
    return load_hf(path, dtype)
  if path.is_dir():
    raise ValueError(f"{path} is not a model directory: it has no config.json (an orbax "
                     "checkpoint has config.json, manifest.json and params/; a Hugging "
                     "Face directory config.json and *.safetensors)")
  raise ValueError(f"{path} is neither a .gguf file nor a model directory (an orbax "
                   "checkpoint, or a Hugging Face folder with config.json and "
                   "*.safetensors)")


def load_foreign_with_tokenizer(path: str | os.PathLike, dtype: str | None = None,
                                quantize: str | None = None):
  """`load_foreign` and the file's tokenizer: (config, params, tokenizer). A GGUF
  file is opened once for both (opening one parses its whole vocabulary: 3.5 s
  for the default model's, half of converting it)."""
  from ridgeline.model.tokenizer import Tokenizer, load_tokenizer
  path = pathlib.Path(path)
  if path.is_file() and path.suffix == ".gguf":
    from ridgeline.model.convert.gguf import load_gguf, open_gguf
    reader = open_gguf(path)
    config, params = load_gguf(path, dtype, keep_quantized=quantize, reader=reader)
    return config, params, Tokenizer.from_gguf(path, reader=reader)
  config, params = load_foreign(path, dtype, quantize=quantize)
  return config, params, load_tokenizer(path)


def _incomplete_ridgeline_checkpoint(path: pathlib.Path) -> str | None:
  """What a damaged orbax checkpoint lacks, when `path` looks like one: it has
  some of config.json (a ModelConfig, not a Hugging Face config), manifest.json
  and params/, but not all (else it would have loaded as a checkpoint)."""
  from ridgeline.model import checkpoint
  names = (checkpoint.CONFIG_FILE, checkpoint.MANIFEST_FILE, checkpoint.PARAMS_DIR)
  present = [n for n in names if (path / n).exists()]
  config = path / checkpoint.CONFIG_FILE
  if present == [checkpoint.CONFIG_FILE]:
    try:
      data = json.loads(config.read_text())
    except (OSError, ValueError):
      return None  # hf.py names an unreadable config.json
    if not isinstance(data, dict) or "architectures" in data or "model_type" in data:
      return None  # a Hugging Face directory
    if "hidden_size" not in data or "num_layers" not in data:
      return None
  if not present:
    return None
  missing = [n for n in names if n not in present]
  return (f"orbax checkpoint {path} is incomplete: missing {', '.join(missing)} "
          f"(it has {', '.join(present)}); convert it again (ridgeline-convert --force)")
