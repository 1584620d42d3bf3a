"""A GGUF file's embedded vocabulary, rebuilt as the tokenizer it was converted from.

llama.cpp keeps a vocabulary as `tokenizer.ggml.*` metadata: tokens, their
types (control, user-defined, byte, ...), merges or scores, and the name of the
pre-tokenizer. Two kinds are rebuilt here for model/tokenizer.py:

- "gpt2": a byte-level BPE (`byte_level_bpe`), an HF `tokenizers` object with
  the pre-tokenizer regexes llama.cpp applies for the file's `tokenizer.ggml.pre`,
- "llama": a sentencepiece vocabulary (`sentencepiece_proto`), a serialized
  ModelProto read the way llama.cpp reads it (BPE merging by score, no
  normalization, optional dummy-prefix space).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# Byte-level BPE pre-tokenization, by `tokenizer.ggml.pre` (llama.cpp's names).
# Each entry is a list of regexes applied in turn, every match and every gap
# kept as its own piece, before the pieces are mapped to byte characters. This
# mirrors llama.cpp's `llm_tokenizer_bpe`, which is what wrote these files.
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
               r"|\s+(?!\S)|\s+")


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# Llama 3 and files llama.cpp reads the same way: it looks a whole piece up in
# the vocabulary before merging (tokenizer.json's `ignore_merges`) and adds BOS
# unless the file says otherwise.
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
               "midm-2.0", "lfm2")


PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # What llama.cpp uses when a file names no pre-tokenizer.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
    # StarCoder's tokenizer (and SmolLM's, trained the same way): every digit alone.
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
                    (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys((*LLAMA3_PRE, "dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2_SPLIT,)),
}


def byte_level_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
  """A GGUF "gpt2" vocabulary as the HF byte-level BPE it was converted from."""
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZER_SPLITS:
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} "
                     f"(supported: {sorted(PRE_TOKENIZER_SPLITS)})")
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", ())]
  tokenizer = tokenizers.Tokenizer(models.BPE(
      vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
      ignore_merges=pre in LLAMA3_PRE))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      *(pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated")
        for split in PRE_TOKENIZER_SPLITS[pre]),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  # Control tokens (<|im_end|>) and user-defined ones (<think>) are matched whole
  # in text; only control tokens are dropped by skip_special_tokens.
  types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL])
  tokenizer.add_tokens([
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, types) if kind == gguf.TokenType.USER_DEFINED])
  return tokenizer


def sentencepiece_proto(meta: Mapping[str, Any]) -> bytes:
  """A GGUF "llama" vocabulary as a serialized sentencepiece ModelProto.

  The file keeps pieces, scores and types (gguf.TokenType numbers them like
  sentencepiece does). The rest is llama.cpp's reading of such a vocabulary:
  BPE merging by score, no normalization, optional dummy-prefix space.
  """
  from sentencepiece import sentencepiece_model_pb2  # Needs protobuf; only this path does.

  tokens = meta["tokenizer.ggml.tokens"]
  scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
  proto = sentencepiece_model_pb2.ModelProto()
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
    # Gemma's files mark <unk> CONTROL; sentencepiece needs it UNKNOWN to have an
    # unk id at all (its original model does).
    if i == unk and kind == gguf.TokenType.CONTROL:
      kind = gguf.TokenType.UNKNOWN
    proto.pieces.add(piece=token, score=score, type=int(kind))
  spec = proto.trainer_spec
  spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = gguf.TokenType.BYTE in types
  for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    setattr(spec, f"{name}_id", -1 if token_id is None else token_id)
    if token_id is not None:
      setattr(spec, f"{name}_piece", tokens[token_id])
  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return proto.SerializeToString()
