"""Every damaged checkpoint fails with an error that names the
path and what is wrong (or, for a missing tokenizer, loads with a warning)."""

import logging
import os
import shutil

import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.model import checkpoint, default_model
from ridgeline.engine import loading
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """A complete tiny checkpoint with the default model's tokenizer beside it."""
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  config = models.get("tiny").replace(vocab_size=49152)
  params = transformer_lib.to_params(transformer_lib.Transformer(config, rngs=nnx.Rngs(0)))
  checkpoint.save(path, params, config)
  load_tokenizer(default_model.gguf_path()).save(path / loading.TOKENIZER_DIR)
  return path


def _damaged(good, tmp_path, remove):
  path = tmp_path / "damaged"
  shutil.copytree(good, path)
  target = path / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  return path


def test_good_checkpoint_loads(good):
  model, tokenizer = loading.load_model(str(good))
  assert tokenizer is not None and model.config.vocab_size == 49152


@pytest.mark.parametrize("remove", ["config.json", "manifest.json", "params"])
def test_checkpoint_missing_a_part_names_it(good, tmp_path, remove):
  path = _damaged(good, tmp_path, remove)
  with pytest.raises(ValueError) as e:
    loading.load_model(str(path))
  msg = str(e.value)
  assert msg.startswith(f"orbax checkpoint {path} is incomplete: missing {remove}"), msg
  assert "Hugging Face" not in msg


def test_corrupt_tokenizer_file_names_the_path(good, tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(good, path)
  tok = path / loading.TOKENIZER_DIR / "tokenizer.json"
  tok.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 12')  # truncated
  with pytest.raises(ValueError) as e:
    loading.load_model(str(path))
  assert str(e.value).startswith(f"cannot read tokenizer directory {tok.parent}: "), e.value


def test_random_bytes_named_gguf(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_bytes(os.urandom(4096))
  with pytest.raises(ValueError) as e:
    loading.load_model(str(path))
  assert str(e.value).startswith(f"{path} is not a readable GGUF file: "), e.value
  with pytest.raises(ValueError, match="is not a readable GGUF file"):
    load_tokenizer(path)


def test_missing_paths_and_foreign_dirs(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'nope'} does not exist$"):
    loading.load_model(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"^{empty} is not a model directory: it has no "
                                        "config.json"):
    loading.load_model(str(empty))
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"hidden_size": 8}')  # no architectures, no model_type
  with pytest.raises(ValueError) as e:
    loading.load_model(str(hf))
  assert str(e.value).startswith(f"Hugging Face config {hf}/config.json: config.json names "
                                 "no model"), e.value
  with pytest.raises(FileNotFoundError, match="tokenizer .* does not exist"):
    load_tokenizer(tmp_path / "nope.json")


def test_missing_tokenizer_folder_warns(good, tmp_path, caplog):
  path = _damaged(good, tmp_path, loading.TOKENIZER_DIR)
  with caplog.at_level(logging.WARNING, logger="ridgeline.engine.loading"):
    _, tokenizer = loading.load_model(str(path))
  assert tokenizer is None
  assert f"checkpoint {path} has no tokenizer ({path / 'tokenizer'} is missing)" in caplog.text
