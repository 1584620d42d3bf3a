"""Model configuration: one frozen dataclass describes every Llama-family network.

Named presets live in `configs/` (shapes only; weights come from checkpoints).
A config is plain data: it round-trips through JSON so a checkpoint can store it
beside the weights (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

ROPE_SCALING_TYPES = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling.

  `llama3`: Llama 3.1's piecewise rescaling of the inverse frequencies
  (factor, low/high frequency factors, original context length).
  `linear`: positions divided by `factor`.
  """

  type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.type not in ROPE_SCALING_TYPES:
      raise ValueError(
          f"rope_scaling.type must be one of {ROPE_SCALING_TYPES}, got {self.type!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama-family decoder (Llama 2/3, SmolLM, Qwen2)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 has a bias on q, k and v projections.
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  name: str = ""
  # None, or a model/quant.py mode ("int8", "int4", "fp8"): the per-layer
  # projections are qwix QArrays of that kind (param_dtype covers the rest).
  quantization: str | None = None
  # Sub-channel block (input rows per scale) of the quantized projections; None:
  # the mode's default (per output channel for int8/fp8; 128, 64 or 32 for int4).
  # Pre-quantized files set it (GGUF Q8_0/Q4_0: 32).
  quantization_block: int | None = None

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "intermediate_size",
                  "max_position_embeddings"):
      if getattr(self, field) <= 0:
        raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    for field in ("param_dtype", "compute_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError as e:
        raise ValueError(f"ModelConfig.{field}: unknown dtype {getattr(self, field)!r}") from e
    if self.quantization_block is not None and self.quantization_block < 1:
      raise ValueError(f"ModelConfig.quantization_block must be >= 1, got "
                       f"{self.quantization_block}")
    if self.quantization not in (None, "int8", "int4", "fp8"):
      raise ValueError(f"ModelConfig.quantization must be None, 'int8', 'int4' or 'fp8', "
                       f"got {self.quantization!r}")

  # Derived quantities -------------------------------------------------------

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def num_params(self) -> int:
    """Parameter count, embeddings included (the LM head counted once if tied)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = d * self.num_heads * self.head_dim
    kv = 2 * d * self.num_kv_heads * self.head_dim
    o = self.num_heads * self.head_dim * d
    bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
    per_layer = q + kv + o + bias + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else v * d
    return v * d + self.num_layers * per_layer + d + head

  def kv_bytes_per_token(self, dtype=None) -> int:
    """Bytes of K and V cache one token occupies across all layers (an 8-bit
    dtype, "int8" or "fp8", includes its scales: model/kv_quant.py)."""
    from model import kv_quant
    per_head = kv_quant.bytes_per_head_token(self.head_dim, dtype, self.compute_dtype)
    return 2 * self.num_layers * self.num_kv_heads * per_head

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # Serialization --------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "ModelConfig":
    return cls.from_dict(json.loads(s))
