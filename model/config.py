"""Model configuration: one frozen dataclass describes every decoder we run.

Llama is the baseline; every other architecture is a set of switches on the same
decoder (see ModelConfig's "Architecture switches"): Qwen2's qkv bias, Qwen3's q/k
norm, Mistral's sliding window, Gemma 2/3's GeGLU, (1 + weight) norms, sandwich
norms, embedding scale, soft-capping and interleaved local/global layers, and
Mixtral / Qwen3-MoE's routed experts.

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
ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama) and GeGLU with tanh GELU (Gemma)
LAYER_TYPES = ("full", "sliding")


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
  """Shapes and numerics of a decoder: Llama 2/3, SmolLM, Qwen2/3, Mistral, Gemma 2/3,
  Mixtral, Qwen3-MoE. The defaults of the architecture switches are Llama's."""

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
  # Architecture switches ------------------------------------------------------
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
  # RMSNorm scales by (norm_weight_offset + weight), in float32 before the cast
  # back (Gemma: 1.0, its weights are stored around 0); 0.0 is Llama's weight * x.
  norm_weight_offset: float = 0.0
  sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 2/3)
  activation: str = "silu"  # gate activation of the gated MLP: see ACTIVATIONS
  embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
  query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim
  attn_softcap: float | None = None  # cap * tanh(logits / cap) on attention logits (Gemma 2)
  final_softcap: float | None = None  # the same on the output logits (Gemma 2)
  sliding_window: int | None = None  # a sliding layer's query sees this many latest keys
  # "full" or "sliding" per layer; None: every layer sliding when sliding_window
  # is set (Mistral), else every layer full.
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: rope_theta
  # Mixture of experts (num_experts > 0 replaces the dense MLP in every layer).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int | None = None  # each expert's width; None: intermediate_size
  norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
  # None, or a model/quant.py mode ("int8", "int4", "fp8"): the per-layer
  # projections are qwix QArrays of that kind (param_dtype covers the rest).
  quantization: str | None = None
  # Sub-channel block (input rows per scale) of the quantized projections; None:
  # the mode's default (int8, int4: affine blocks of 32; fp8: per output channel).
  # Pre-quantized files set it (GGUF Q8_0/Q4_0/Q4_1: 32; HF fp8 weight_block_size).
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
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, "
                       f"got {self.activation!r}")
    if self.layer_types is not None:
      if not isinstance(self.layer_types, tuple):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries for "
                         f"{self.num_layers} layers")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ValueError(f"ModelConfig.layer_types: unknown types {bad}; known: {LAYER_TYPES}")
      if "sliding" in self.layer_types and self.sliding_window is None:
        raise ValueError("ModelConfig.layer_types has sliding layers but sliding_window is None")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"ModelConfig.sliding_window must be >= 1, got {self.sliding_window}")
    for field in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
      if getattr(self, field) is not None and getattr(self, field) <= 0:
        raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
    if self.num_experts < 0:
      raise ValueError(f"ModelConfig.num_experts must be >= 0, got {self.num_experts}")
    if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"ModelConfig.num_experts_per_tok must be in [1, {self.num_experts}], "
                       f"got {self.num_experts_per_tok}")
    if self.moe_intermediate_size is not None and self.moe_intermediate_size <= 0:
      raise ValueError("ModelConfig.moe_intermediate_size must be positive, got "
                       f"{self.moe_intermediate_size}")
    if self.quantization_block is not None and self.quantization_block < 1:
      raise ValueError(f"ModelConfig.quantization_block must be >= 1, got "
                       f"{self.quantization_block}")
    if self.quantization not in (None, "int8", "int4", "fp8"):
      raise ValueError(f"ModelConfig.quantization must be None, 'int8', 'int4' or 'fp8', "
                       f"got {self.quantization!r}")

  # Derived quantities -------------------------------------------------------

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def expert_size(self) -> int:
    """Width of one expert's MLP."""
    return self.moe_intermediate_size or self.intermediate_size

  def layer_type(self, layer: int) -> str:
    if self.layer_types is not None:
      return self.layer_types[layer]
    return "sliding" if self.sliding_window is not None else "full"

  def layer_window(self, layer: int) -> int | None:
    """How many latest positions (itself included) a query of `layer` attends to;
    None: all of them."""
    return self.sliding_window if self.layer_type(layer) == "sliding" else None

  @property
  def kv_window(self) -> int | None:
    """How many latest positions any layer can still attend to, when every layer
    slides (Mistral); None when some layer attends to everything (Gemma's global
    layers, full-attention models). A KV page whose last position is below
    `next_position - kv_window + 1` is never read again and can be released."""
    windows = [self.layer_window(i) for i in range(self.num_layers)]
    return None if None in windows else max(windows)

  def layer_uses_local_rope(self, layer: int) -> bool:
    """Sliding layers of a model with a separate local RoPE base (Gemma 3) use it,
    unscaled; every other layer uses rope_theta and rope_scaling."""
    return self.rope_local_theta is not None and self.layer_type(layer) == "sliding"

  def layer_rope_theta(self, layer: int) -> float:
    return self.rope_local_theta if self.layer_uses_local_rope(layer) else self.rope_theta

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def mlp_params_per_layer(self, active: bool = False) -> int:
    """Weights of one layer's MLP: the dense MLP, or the router plus every expert
    (only the num_experts_per_tok a token uses when `active`)."""
    d = self.hidden_size
    if not self.is_moe:
      return 3 * d * self.intermediate_size
    experts = self.num_experts_per_tok if active else self.num_experts
    return d * self.num_experts + experts * 3 * d * self.expert_size

  def num_params(self, active: bool = False) -> int:
    """Parameter count, embeddings included (the LM head counted once if tied);
    `active`: only the experts one token runs through."""
    d, v = self.hidden_size, self.vocab_size
    q = d * self.num_heads * self.head_dim
    kv = 2 * d * self.num_kv_heads * self.head_dim
    o = self.num_heads * self.head_dim * d
    bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
    norms = (4 if self.sandwich_norms else 2) * d + (2 * self.head_dim if self.qk_norm else 0)
    per_layer = q + kv + o + bias + self.mlp_params_per_layer(active) + norms
    head = 0 if self.tie_word_embeddings else v * d
    return v * d + self.num_layers * per_layer + d + head

  def kv_bytes_per_token(self, dtype=None) -> int:
    """Bytes of K and V cache one token occupies across all layers (an 8-bit
    dtype, "int8" or "fp8", includes its scales: model/kv_quant.py)."""
    from ridgeline.model import kv_quant
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
