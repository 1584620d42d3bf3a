"""The per-token math of the decoder, as small functions over leading "..." dims.

Every function here takes activations shaped [..., D] (or [..., N, Dh] for
heads) and never looks at the leading dimensions, so it serves a [B, T, D]
batch and a flat ragged [N, D] batch of tokens alike. The decoder
(model/transformer.py) chooses among them by configuration (`ModelConfig`'s
architecture switches); there is one decoder, not one per architecture.

Numerics follow Hugging Face transformers, the reference every parity test
compares with: norms in float32, matmuls in the compute dtype, routing
softmax in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """RMSNorm over the last axis, computed in float32.

  offset 0 (Llama, Qwen, Mistral): `weight * normed` with both in x's dtype, as
  transformers' LlamaRMSNorm casts before scaling. offset 1 (Gemma): `normed *
  (1 + weight)` in float32, then cast, as Gemma's RMSNorm does (its weights are
  stored around 0).
  """
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if offset:
    return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == "silu":
    return jax.nn.silu(x)
  if name == "gelu_tanh":  # transformers' gelu_pytorch_tanh
    return jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unknown activation {name!r}")


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
              act: str = "silu") -> jax.Array:
  """SwiGLU / GeGLU: down(act(x @ gate) * (x @ up)). x: [..., D] -> [..., D]."""
  from ridgeline.model import quant  # the weights may be qwix QArrays (a quantized model)
  dtype = x.dtype
  g = quant.einsum("...d,df->...f", x, gate, dtype)  # [..., F]
  u = quant.einsum("...d,df->...f", x, up, dtype)  # [..., F]
  return quant.einsum("...f,fd->...d", activation(act, g) * u, down, dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap) (Gemma 2's attention and final logits); identity for None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def embed(table: jax.Array, tokens: jax.Array, dtype, scale: bool = False) -> jax.Array:
  """Rows of the embedding table in the compute dtype; times sqrt(hidden) when
  `scale` (Gemma), the factor rounded to the compute dtype first as transformers
  does (sqrt(640) = 25.298 is 25.25 in bfloat16). tokens: [...] -> [..., D]."""
  x = table[tokens].astype(dtype)
  if scale:
    x = x * jnp.asarray(math.sqrt(table.shape[-1]), dtype)
  return x


# Mixture of experts ------------------------------------------------------------------


def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool,
          ) -> tuple[jax.Array, jax.Array]:
  """Top-k routing as Mixtral and Qwen3-MoE do it: router logits in the compute
  dtype, softmax over all experts in float32, the k largest probabilities, and
  (Mixtral always; Qwen3-MoE when norm_topk_prob) renormalised to sum to 1.

  x: [..., D], router: [D, E] -> (weights [..., k] float32, experts [..., k] int32).
  """
  logits = jnp.einsum("...d,de->...e", x, router.astype(x.dtype))  # [..., E]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)  # [..., k] each
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def moe_mlp(x: jax.Array, router: jax.Array, experts_gate: jax.Array,
            experts_up: jax.Array, experts_down: jax.Array, *, top_k: int,
            normalize: bool, act: str = "silu") -> jax.Array:
  """A routed-experts MLP as grouped matrix products.

  The tokens are flattened to [N, D], each (token, choice) pair becomes a row,
  the N*k rows are sorted by expert so each expert's rows are contiguous, and
  `jax.lax.ragged_dot` multiplies each group of rows by its own expert's
  weights: the work is the chosen experts' only, with no loop over experts and
  no product with the experts a token did not pick. The rows are then put back
  in token order and summed with their routing weights.

  x: [..., D]; router [D, E]; experts_gate/up [E, D, F]; experts_down [E, F, D].
  """
  shape = x.shape
  dim = shape[-1]
  num_experts = experts_gate.shape[0]
  dtype = x.dtype
  flat = x.reshape(-1, dim)  # [N, D]
  weights, experts = route(flat, router, top_k, normalize)  # [N, k] each
  choice = experts.reshape(-1)  # [N*k] expert of each (token, choice) row
  order = jnp.argsort(choice, stable=True)  # [N*k] rows grouped by expert
  group_sizes = jnp.bincount(choice, length=num_experts).astype(jnp.int32)  # [E]
  rows = flat[order // top_k]  # [N*k, D] token of each sorted row
  g = jax.lax.ragged_dot(rows, experts_gate.astype(dtype), group_sizes)  # [N*k, F]
  u = jax.lax.ragged_dot(rows, experts_up.astype(dtype), group_sizes)  # [N*k, F]
  out = jax.lax.ragged_dot(activation(act, g) * u, experts_down.astype(dtype),
                           group_sizes)  # [N*k, D], sorted
  out = out[jnp.argsort(order)].reshape(-1, top_k, dim)  # [N, k, D] token order
  y = jnp.einsum("nkd,nk->nd", out, weights.astype(dtype))  # [N, D]
  return y.reshape(shape)
