"""Helpers for tests over transformers models: tiny random ones saved with
save_pretrained, and a real GGUF loaded by transformers as the reference."""

from __future__ import annotations

import os
import pathlib

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers


def from_gguf(gguf: str | pathlib.Path):
  """transformers' own float32 model and tokenizer for a GGUF file (offline):
  the reference the parity tests compare with."""
  os.environ["HF_HUB_OFFLINE"] = "1"
  path = pathlib.Path(gguf)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return model.eval(), tokenizer


def write_tokenizer(path: str | pathlib.Path, vocab_size: int) -> None:
  """A word-level tokenizer.json over `vocab_size` made-up words (w0, w1, ...), with
  <unk> as id 0, so a random model directory is also a complete one to serve."""
  vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(pathlib.Path(path) / "tokenizer.json"))


def save_random(path: str | pathlib.Path, model_cls, hf_config, dtype=torch.float32,
                seed: int = 0, perturb: float = 0.5, tokenizer: bool = True):
  """Saves a random `model_cls(hf_config)` (norms and biases randomized too, so they
  matter in comparisons) with save_pretrained; returns the torch model (eval)."""
  torch.manual_seed(seed)
  model = model_cls(hf_config).to(dtype).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.copy_(torch.randn_like(p) * perturb + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(path, safe_serialization=True)
  if tokenizer:
    write_tokenizer(path, hf_config.vocab_size)
  return model


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pad_token_id=0, eos_token_id=None)
  return out[0, len(ids):].tolist()


SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
