"""The canonical parameter tree every converter produces and every checkpoint stores.

```
{
  "embed": [vocab, hidden],
  "layers": [                               # one dict per decoder block
    {"attn_norm": [hidden],
     "q": [hidden, heads * head_dim],        # [in, out]: x @ w
     "k": [hidden, kv_heads * head_dim],
     "v": [hidden, kv_heads * head_dim],
     "q_bias": [heads * head_dim],           # only when config.qkv_bias
     "k_bias": [kv_heads * head_dim],        # only when config.qkv_bias
     "v_bias": [kv_heads * head_dim],        # only when config.qkv_bias
     "q_norm": [head_dim],                   # only when config.qk_norm
     "k_norm": [head_dim],                   # only when config.qk_norm
     "o": [heads * head_dim, hidden],
     "post_attn_norm": [hidden],             # only when config.sandwich_norms
     "mlp_norm": [hidden],
     "gate": [hidden, intermediate],         # dense MLP (not config.is_moe)
     "up": [hidden, intermediate],
     "down": [intermediate, hidden],
     "router": [hidden, experts],            # MoE instead of gate/up/down
     "experts_gate": [experts, hidden, expert_size],
     "experts_up": [experts, hidden, expert_size],
     "experts_down": [experts, expert_size, hidden],
     "post_mlp_norm": [hidden]},             # only when config.sandwich_norms
    ...],
  "final_norm": [hidden],
  "lm_head": [hidden, vocab],               # only when not tie_word_embeddings
}
```

Projections are stored `[in, out]` (the transpose of torch's `nn.Linear.weight`), and
q/k use the Hugging Face (rotate-half) RoPE convention: GGUF's interleaved row order
is undone by its converter. Layers are separate arrays, never one stacked array: a
jitted step that slices a layer out of a stacked array copies it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ridgeline.model.config import ModelConfig

Params = dict[str, Any]


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, f = config.hidden_size, config.intermediate_size
  q_out = config.num_heads * config.head_dim
  kv_out = config.num_kv_heads * config.head_dim
  shapes = {
      "attn_norm": (d,),
      "q": (d, q_out),
      "k": (d, kv_out),
      "v": (d, kv_out),
      "o": (q_out, d),
      "mlp_norm": (d,),
  }
  if config.is_moe:
    e, fe = config.num_experts, config.expert_size
    shapes.update(router=(d, e), experts_gate=(e, d, fe), experts_up=(e, d, fe),
                  experts_down=(e, fe, d))
  else:
    shapes.update(gate=(d, f), up=(d, f), down=(f, d))
  if config.qkv_bias:
    shapes.update(q_bias=(q_out,), k_bias=(kv_out,), v_bias=(kv_out,))
  if config.qk_norm:
    shapes.update(q_norm=(config.head_dim,), k_norm=(config.head_dim,))
  if config.sandwich_norms:
    shapes.update(post_attn_norm=(d,), post_mlp_norm=(d,))
  return shapes


def param_shapes(config: ModelConfig) -> Params:
  """The expected tree of shapes (tuples) for `config`."""
  tree: Params = {
      "embed": (config.vocab_size, config.hidden_size),
      "layers": [layer_shapes(config) for _ in range(config.num_layers)],
      "final_norm": (config.hidden_size,),
  }
  if not config.tie_word_embeddings:
    tree["lm_head"] = (config.hidden_size, config.vocab_size)
  return tree


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
  """{"layers.3.q": leaf, ...}: the names used in error messages."""
  out: dict[str, Any] = {}
  items = enumerate(tree) if isinstance(tree, list) else tree.items()
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, (dict, list)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def unflatten(flat: dict[str, Any], config: ModelConfig) -> Params:
  """Inverse of `flatten` for the canonical layout of `config`."""
  tree: Params = {"layers": [{} for _ in range(config.num_layers)]}
  for name, value in flat.items():
    parts = name.split(".")
    if parts[0] == "layers":
      tree["layers"][int(parts[1])][parts[2]] = value
    else:
      tree[parts[0]] = value
  return tree


def check(params: Params, config: ModelConfig, source: str = "parameters") -> None:
  """Raise ValueError naming every missing, unexpected or misshapen tensor."""
  expected = flatten(param_shapes(config))
  got = flatten(params)
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  wrong = [f"{n}: expected {expected[n]}, got {tuple(np.shape(got[n]))}"
           for n in sorted(set(expected) & set(got))
           if tuple(np.shape(got[n])) != tuple(expected[n])]
  problems = []
  if missing:
    problems.append(f"missing tensors {missing}")
  if extra:
    problems.append(f"unexpected tensors {extra}")
  if wrong:
    problems.append("wrong shapes: " + "; ".join(wrong))
  if problems:
    raise ValueError(f"{source} do not match the model config: " + ", ".join(problems))
