"""The decoder in Flax NNX: Llama 2/3, SmolLM2, Qwen2/3, Mistral, Gemma 2/3, Mixtral,
Qwen3-MoE, as one code path whose differences are ModelConfig switches.

embed (x sqrt(D) for Gemma)
  -> N x [RMSNorm -> GQA attention with RoPE (q/k norm, sliding window, soft-cap
          where configured) -> (post-attention norm) -> residual,
          RMSNorm -> gated MLP (SwiGLU / GeGLU) or routed experts
          -> (post-MLP norm) -> residual]
  -> RMSNorm -> logits (soft-capped where configured)

The per-token math lives in model/layers.py.

The module holds only weights. The KV cache is a separate pytree (one K and one V
page pool per layer) that goes in and comes back out of every call, so a jitted
step can donate it and XLA updates it in place. All caching goes through
`attention.write_kv` and `attention.attend`.

Attribute names equal the canonical parameter tree of `model/params.py`, so
`from_params` / `to_params` are plain attribute walks. Each layer's weights are
separate arrays: the Python loop over layers unrolls at trace time and reads each
weight where it lies, with no per-layer slicing of a stacked array.

Dimension names in shape comments: N tokens of the step, R rows sampled, D hidden,
H query heads, K kv heads, G queries per kv head, Dh head dim, F MLP width,
V vocabulary, P pages, S page size, NB pages per sequence.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ridgeline.util import ceil_div
from ridgeline.model import attention
from ridgeline.model import layers as layers_lib
from ridgeline.model import kv_quant
from ridgeline.model import params as params_lib
from ridgeline.model import quant
from ridgeline.model import sharding as sharding_lib
from ridgeline.model.config import ModelConfig

# One (K, V) pair of page pools per layer, each [P, S, K, Dh].
KVPages = tuple[tuple[jax.Array, jax.Array], ...]


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse RoPE frequencies [Dh/2], with llama3 or linear scaling applied.
  `local`: those of the sliding layers that have their own base (Gemma 3's
  rope_local_theta, unscaled)."""
  dim = config.head_dim
  theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = None if local and config.rope_local_theta else config.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.type == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  # llama3: keep high frequencies, divide low ones by `factor`, blend between.
  old_ctx = scaling.original_max_position_embeddings
  low_wavelen = old_ctx / scaling.low_freq_factor
  high_wavelen = old_ctx / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face convention). x: [..., H, Dh], positions [...]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., Dh/2]
  cos = jnp.cos(angles)[..., None, :]  # [..., 1, Dh/2]
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [..., H, Dh/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


rms_norm = layers_lib.rms_norm  # (x, weight, eps, offset=0.0): see model/layers.py


def _init(shape: tuple[int, ...], name: str, dtype, rngs: nnx.Rngs) -> jax.Array:
  if name.endswith("norm"):
    return jnp.ones(shape, dtype)
  if name.endswith("bias"):
    return jnp.zeros(shape, dtype)
  return (0.02 * jax.random.normal(rngs.params(), shape)).astype(dtype)


def _matmul(spec: str, x: jax.Array, w, dtype) -> jax.Array:
  """Where a projection weight enters the network: a float array, or a qwix
  QArray of a quantized model (int8/int4 weight-only, fp8 W8A8 on fp8 hardware);
  see model/quant.py."""
  return quant.einsum(spec, x, w, dtype)


class Block(nnx.Module):
  """One decoder layer. Weights are named as in `params.layer_shapes`."""

  def __init__(self, config: ModelConfig, layer: int = 0, *, rngs: nnx.Rngs):
    self.config = config
    self.window = config.layer_window(layer)  # static: None or the sliding window
    for name, shape in params_lib.layer_shapes(config).items():
      setattr(self, name, nnx.Param(_init(shape, name, config.weight_dtype, rngs)))

  def __call__(self, x, positions, inv_freq, kv, slots, layout, attention_impl):
    """x: [N, D] the step's tokens; positions, slots: [N]; layout: attention.StepLayout."""
    cfg = self.config
    dtype = cfg.dtype
    n = x.shape[0]
    eps, offset = cfg.rms_norm_eps, cfg.norm_weight_offset

    h = rms_norm(x, self.attn_norm[...], eps, offset)  # [N, D]
    q = _matmul("nd,dh->nh", h, self.q[...], dtype)
    k = _matmul("nd,dh->nh", h, self.k[...], dtype)
    v = _matmul("nd,dh->nh", h, self.v[...], dtype)
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dtype)
      k = k + self.k_bias[...].astype(dtype)
      v = v + self.v_bias[...].astype(dtype)
    q = q.reshape(n, cfg.num_heads, cfg.head_dim)  # [N, H, Dh]
    k = k.reshape(n, cfg.num_kv_heads, cfg.head_dim)  # [N, K, Dh]
    v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)  # [N, K, Dh]
    if cfg.qk_norm:  # per head, over Dh
      q = rms_norm(q, self.q_norm[...], eps, offset)
      k = rms_norm(k, self.k_norm[...], eps, offset)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    rot = kv_quant.rotation(kv[0], cfg.head_dim)  # an int8 cache holds rotated heads
    if rot is not None:
      q, k, v = (kv_quant.rotate(t, rot) for t in (q, k, v))

    k_pages, v_pages = attention.write_kv(kv[0], kv[1], k, v, slots)
    # On a mesh the updated pools keep the pools' sharding; left free, the
    # partitioner may shard them like the queries that read them (a replicated
    # pool split by KV head) and gather them back whole for the output.
    k_pages = sharding_lib.constrain(k_pages, sharding_lib.KV_AXES)
    v_pages = sharding_lib.constrain(v_pages, sharding_lib.KV_AXES)
    attn = attention.attend(q, k_pages, v_pages, positions, layout,
                            impl=attention_impl, window=self.window,
                            softcap=cfg.attn_softcap,
                            scale=cfg.attention_scale)  # [N, H, Dh]
    if rot is not None:
      attn = kv_quant.rotate(attn, rot)
    attn = attn.reshape(n, cfg.num_heads * cfg.head_dim)
    h = _matmul("nh,hd->nd", attn, self.o[...], dtype)
    if cfg.sandwich_norms:
      h = rms_norm(h, self.post_attn_norm[...], eps, offset)
    x = x + h

    h = rms_norm(x, self.mlp_norm[...], eps, offset)
    if cfg.is_moe:
      h = layers_lib.moe_mlp(h, self.router[...], self.experts_gate[...],
                             self.experts_up[...], self.experts_down[...],
                             top_k=cfg.num_experts_per_tok, normalize=cfg.norm_topk_prob,
                             act=cfg.activation)
    else:
      h = layers_lib.gated_mlp(h, self.gate[...], self.up[...], self.down[...],
                               cfg.activation)
    if cfg.sandwich_norms:
      h = rms_norm(h, self.post_mlp_norm[...], eps, offset)
    return x + h, (k_pages, v_pages)


@functools.partial(jax.jit, static_argnums=(0, 8, 9))
def _run_block(graphdef, state, x, positions, inv_freq, kv, slots, layout, attention_impl,
               rules):
  """One layer as its own jitted function. Layers of one structure (all of them,
  or each kind of Gemma's local/global layers) share one trace: a step's 30
  layers are traced once, not 30 times (tracing was most of the 1 s of Python
  each step variant spent before XLA saw it). XLA inlines the calls, so the
  compiled step is the same as the unrolled one. `rules`: the sharding rules in
  effect (`sharding.rules_key()`), which the trace bakes in, so a trace made
  under one mesh's rules is never reused under another's."""
  del rules
  return nnx.merge(graphdef, state)(x, positions, inv_freq, kv, slots, layout, attention_impl)


class Transformer(nnx.Module):
  """The decoder. Call it on one step's flat batch of tokens and the KV page pools."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
               attention_impl: str = "auto"):
    self.config = config
    self.attention_impl = attention_impl
    dtype = config.weight_dtype
    shapes = params_lib.param_shapes(config)
    self.embed = nnx.Param(_init(shapes["embed"], "embed", dtype, rngs))
    self.layers = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = nnx.Param(jnp.ones(shapes["final_norm"], dtype))
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Param(_init(shapes["lm_head"], "lm_head", dtype, rngs))
    # A constant, not a parameter: not saved, not sharded, folded by XLA.
    self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config)))
    self.inv_freq_local = nnx.Variable(jnp.asarray(rope_inv_freq(config, local=True)))

  def __call__(self, tokens: jax.Array, positions: jax.Array, kv: KVPages,
               slots: jax.Array, layout: attention.StepLayout,
               logits_indices: jax.Array | None = None,
               ) -> tuple[jax.Array, KVPages]:
    """Runs a step's tokens through the network, writing their K/V into the pages.

    Args:
      tokens: [N] int32 token ids: the decode rows, then the prefill tiles
        (see `attention.StepLayout`; padding: any id).
      positions: [N] int32 absolute positions (-1 for padding).
      kv: the page pools, one (K, V) pair per layer.
      slots: [N] int32 flat cache slot per token (a scratch slot for padding).
      layout: the step's regions and their block tables.
      logits_indices: [R] int32 which tokens to compute logits for, or None for
        logits at every token.

    Returns (float32 logits [R, V] or [N, V], updated page pools).
    """
    cfg = self.config
    x = layers_lib.embed(self.embed[...], tokens, cfg.dtype, cfg.embed_scale)  # [N, D]
    new_kv = []
    for i, (layer, layer_kv) in enumerate(zip(self.layers, kv)):
      inv_freq = (self.inv_freq_local if cfg.layer_uses_local_rope(i) else self.inv_freq)[...]
      graphdef, state = nnx.split(layer)
      x, layer_kv = _run_block(graphdef, state, x, positions, inv_freq, layer_kv, slots,
                               layout, self.attention_impl, sharding_lib.rules_key())
      new_kv.append(layer_kv)
    if logits_indices is not None:
      x = x[logits_indices]  # [R, D]
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, cfg.norm_weight_offset)
    if cfg.tie_word_embeddings:
      logits = jnp.einsum("...d,vd->...v", x, self.embed[...].astype(cfg.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("...d,dv->...v", x, self.lm_head[...].astype(cfg.dtype),
                          preferred_element_type=jnp.float32)
    return layers_lib.softcap(logits, cfg.final_softcap), tuple(new_kv)


# Weights in and out ------------------------------------------------------------


def from_params(config: ModelConfig, params: params_lib.Params,
                attention_impl: str = "auto") -> Transformer:
  """Builds a Transformer holding `params` (numpy or jax arrays, any sharding).

  The module is created abstractly (no random init is materialized), then each
  canonical tensor is placed in its attribute.
  """
  params_lib.check(params, config)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0),
                                             attention_impl=attention_impl))
  for name, value in params_lib.flatten(params).items():
    owner, attr = _owner(model, name)
    getattr(owner, attr).set_value(_as_array(value, config.weight_dtype))
  model.inv_freq.set_value(jnp.asarray(rope_inv_freq(config)))
  model.inv_freq_local.set_value(jnp.asarray(rope_inv_freq(config, local=True)))
  return model


def to_params(model: Transformer) -> params_lib.Params:
  """The canonical parameter tree of `model` (jax arrays, shardings kept)."""
  flat = {name: getattr(*_owner(model, name))[...]
          for name in params_lib.flatten(params_lib.param_shapes(model.config))}
  return params_lib.unflatten(flat, model.config)


def _owner(model: Transformer, name: str):
  parts = name.split(".")
  if parts[0] == "layers":
    return model.layers[int(parts[1])], parts[2]
  return model, parts[0]


def _as_array(value, dtype) -> jax.Array:
  if isinstance(value, quant.QArray):  # a quantized projection: each field as it is
    return jax.tree.map(lambda leaf: _as_array(leaf, leaf.dtype), value)
  if isinstance(value, jax.Array):
    return value if value.dtype == dtype else value.astype(dtype)
  return jnp.asarray(np.asarray(value), dtype=dtype)


def init_kv_pages(config: ModelConfig, num_pages: int, page_size: int,
                  dtype=None, sharding=None) -> KVPages:
  """Zeroed page pools: one (K, V) pair of [P, S, K, Dh] arrays per layer (each a
  qwix QArray of values and [P, S, K, 1] scales for an 8-bit `dtype`)."""
  shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.compute_dtype  # "int8" / "fp8": 8-bit pools (model/kv_quant.py)
  make = lambda: kv_quant.init_pool(shape, dtype, sharding)
  return tuple((make(), make()) for _ in range(config.num_layers))


def contiguous_inputs(lengths: Sequence[int], page_size: int) -> dict:
  """Inputs for a whole-prompt forward of several sequences at once, each one
  prefill tile of max(lengths) tokens, where sequence b owns pages laid out
  contiguously (b * NB ... b * NB + NB - 1), plus one scratch page last for the
  padding tokens: used by tests and single-shot scoring. Token b * T + t of the
  flat batch is sequence b's token t."""
  batch, max_len = len(lengths), max(lengths)
  pages_per_seq = ceil_div(max_len, page_size)
  positions = np.tile(np.arange(max_len, dtype=np.int32), (batch, 1))
  block_tables = (np.arange(batch)[:, None] * pages_per_seq
                  + np.arange(pages_per_seq)[None, :]).astype(np.int32)
  slots = (block_tables[:, positions[0] // page_size] * page_size
           + positions % page_size).astype(np.int32)
  scratch = batch * pages_per_seq
  for b, n in enumerate(lengths):
    slots[b, n:] = scratch * page_size
    positions[b, n:] = -1
  layout = attention.StepLayout(
      np.zeros((0, pages_per_seq), np.int32), np.zeros((0,), np.int32), block_tables,
      np.asarray(lengths, np.int32))
  return dict(positions=positions.reshape(-1), slots=slots.reshape(-1), layout=layout,
              num_pages=scratch + 1)


def score(model: Transformer, tokens, page_size: int = 8,
          lengths: Sequence[int] | None = None) -> jax.Array:
  """Logits at every position of prompts `tokens` [B, T] (row b's first lengths[b]
  tokens are real, the rest padding; default: all T) in one jitted forward pass
  over fresh pages (tests, evaluation, single-shot scoring): [B, T, V]."""
  tokens = np.asarray(tokens, np.int32)
  batch, length = tokens.shape
  lengths = [length] * batch if lengths is None else list(lengths)
  inputs = contiguous_inputs(lengths, page_size)
  if max(lengths) < length:
    tokens = tokens[:, :max(lengths)]
  kv = init_kv_pages(model.config, int(inputs["num_pages"]), page_size)
  logits = _forward_all(model, jnp.asarray(tokens.reshape(-1)), jnp.asarray(inputs["positions"]),
                        kv, jnp.asarray(inputs["slots"]), inputs["layout"])
  return logits.reshape(batch, tokens.shape[1], -1)


@nnx.jit
def _forward_all(model, tokens, positions, kv, slots, layout):
  return model(tokens, positions, kv, slots, layout)[0]
