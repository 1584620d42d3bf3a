"""Foreign checkpoint formats -> (ModelConfig, canonical params)."""

from __future__ import annotations

import os
import pathlib

from model.config import ModelConfig
from model.params import Params


def load_foreign(path: str | os.PathLike, dtype: str = "float32",
                 quantize: str | None = None) -> tuple[ModelConfig, Params]:
  """A GGUF file or a Hugging Face model directory, chosen by what `path` is.

  `quantize`: the mode the caller will quantize to; a GGUF file already in that
  format (Q8_0 for int8, Q4_0 for int4) keeps its own blocks. A Hugging Face fp8
  checkpoint always loads as fp8."""
  path = pathlib.Path(path)
  if path.is_file() and path.suffix == ".gguf":
    from model.convert.gguf import load_gguf
    return load_gguf(path, dtype, keep_quantized=quantize)
  if path.is_dir() and (path / "config.json").exists():
    from model.convert.hf import load_hf
    return load_hf(path, dtype)
  raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory "
                   "(a folder with config.json and *.safetensors)")
