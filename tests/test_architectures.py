"""Every supported architecture against transformers (torch, CPU, fp32): tiny random
configs saved with save_pretrained, loaded through our HF converter.

Per architecture: logits over a 64-token prompt within 1e-4 relative, and 32-token
greedy continuations through Engine.generate identical to transformers' generate.
Sliding-window models get a window (16) far shorter than the prompts, and the
engine prefills in chunks shorter than the prompt, so the window crosses pages,
chunks and decode steps.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import layers as layers_lib
from ridgeline.model import sharding
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.convert.hf import load_hf
from tests.hf_tiny import hf_greedy, save_random

VOCAB, PROMPT_LEN, NEW_TOKENS, WINDOW = 256, 64, 32, 16
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)

CASES = {
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        **BASE, intermediate_size=96, head_dim=24, tie_word_embeddings=False,
        rope_theta=1e6)),
    "mistral_sliding": (transformers.MistralForCausalLM, transformers.MistralConfig(
        **BASE, intermediate_size=96, sliding_window=WINDOW)),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **BASE, intermediate_size=96, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=20.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **BASE, intermediate_size=96, head_dim=16, sliding_window=WINDOW,
        attn_logit_softcapping=5.0, final_logit_softcapping=10.0, query_pre_attn_scalar=16,
        attn_implementation="eager")),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig(
        **BASE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
        **BASE, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False)),
    "qwen3_moe_norm_topk": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
        **BASE, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True)),
}
MOE_CASES = ("mixtral", "qwen3_moe", "qwen3_moe_norm_topk")


@functools.cache
def _saved(case, root):
  import pathlib
  path = pathlib.Path(root) / case
  cls, config = CASES[case]
  hf_model = save_random(path, cls, config, perturb=0.3)
  return path, hf_model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("arch"))


def _prompts(n=2, length=PROMPT_LEN, seed=1):
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(1, VOCAB, size=length - 7 * i))) for i in range(n)]


@pytest.mark.parametrize("case", sorted(set(CASES) - {"qwen3_moe_norm_topk"}))
def test_logits_and_greedy_match_transformers(case, root):
  path, hf_model = _saved(case, root)
  config, params = load_hf(path)
  model = transformer_lib.from_params(config, params)
  tokens = np.asarray(_prompts(2, seed=2)[0] * 2).reshape(2, PROMPT_LEN)
  tokens[1] = np.random.default_rng(3).integers(0, VOCAB, PROMPT_LEN)
  logits = transformer_lib.score(model, tokens, 8)
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  rel = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
  assert rel <= 1e-4, f"{case}: max relative logit difference {rel:.2e}"

  engine = Engine(model, None, EngineConfig(page_size=8, num_pages=64, max_batch=4,
                                            prefill_chunk=24, max_prefill_batch=2))
  prompts = _prompts(2)
  outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
  for prompt, out in zip(prompts, outs):
    assert out.token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS), case


def test_configs_carry_the_architecture(root):
  gemma3, _ = load_hf(_saved("gemma3", root)[0])
  assert gemma3.norm_weight_offset == 1.0 and gemma3.sandwich_norms and gemma3.qk_norm
  assert gemma3.activation == "gelu_tanh" and gemma3.embed_scale
  assert [gemma3.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
  assert [gemma3.layer_rope_theta(i) for i in range(3)] == [1e4, 1e6, 1e4]
  assert gemma3.attn_softcap is None and gemma3.final_softcap == 20.0
  mistral, _ = load_hf(_saved("mistral_sliding", root)[0])
  # The window limits attention, not the context.
  assert mistral.sliding_window == WINDOW and mistral.max_position_embeddings == 512
  assert mistral.kv_window == WINDOW and gemma3.kv_window is None  # global layers
  qwen3, _ = load_hf(_saved("qwen3", root)[0])
  assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.sliding_window is None
  mixtral, params = load_hf(_saved("mixtral", root)[0])
  assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (4, 2, True)
  assert params["layers"][0]["experts_down"].shape == (4, 48, 64)


@pytest.mark.parametrize("case", MOE_CASES)
def test_routing_picks_the_experts_transformers_picks(case, root):
  path, hf_model = _saved(case, root)
  config, params = load_hf(path)
  x = torch.randn(200, config.hidden_size, generator=torch.Generator().manual_seed(0))
  for layer in range(config.num_layers):
    block = hf_model.model.layers[layer]
    hf_router = block.mlp.gate  # transformers 5 names Mixtral's block `mlp` too
    with torch.no_grad():
      _, hf_weights, hf_experts = hf_router(x)
    weights, experts = layers_lib.route(jnp.asarray(x.numpy()), params["layers"][layer]["router"],
                                        config.num_experts_per_tok, config.norm_topk_prob)
    np.testing.assert_array_equal(np.sort(np.asarray(experts), -1),
                                  np.sort(hf_experts.numpy(), -1))
    order = np.argsort(np.asarray(experts), -1)
    hf_order = np.argsort(hf_experts.numpy(), -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1),
                               np.take_along_axis(hf_weights.float().numpy(), hf_order, -1),
                               rtol=1e-5, atol=1e-6)
    # The MoE MLP itself equals transformers' block on the same input.
    with torch.no_grad():
      moe = block.mlp
      want = moe(x[None])[0].numpy()
    p = params["layers"][layer]
    got = layers_lib.moe_mlp(jnp.asarray(x.numpy()), p["router"], p["experts_gate"],
                             p["experts_up"], p["experts_down"],
                             top_k=config.num_experts_per_tok, normalize=config.norm_topk_prob)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


MESH_ENGINE = EngineConfig(page_size=8, num_pages=24, max_model_len=96, max_batch=4,
                           prefill_chunk=32, max_prefill_batch=2)
MESH_GREEDY = SamplingParams(temperature=0, max_tokens=8)


@functools.cache
def _single_device_greedy(case, root):
  config, params = load_hf(_saved(case, root)[0])
  plain = Engine(transformer_lib.from_params(config, params), None, MESH_ENGINE)
  return [o.token_ids for o in plain.generate(_prompts(2, length=20), MESH_GREEDY)]


# 1x2, 1x4: expert parallelism (4 and 8 experts divide `model`); 1x8: Mixtral's 4
# experts do not divide 8, so each expert's width is split instead.
@pytest.mark.parametrize("case, mesh", [("mixtral", "1x2"), ("qwen3_moe", "1x4"),
                                        ("mixtral", "1x8")])
def test_moe_greedy_unchanged_on_a_mesh(case, mesh, root):
  config, params = load_hf(_saved(case, root)[0])
  mesh = sharding.make_mesh(mesh)
  placed = sharding.place(params, sharding.param_shardings(config, mesh))
  engine = Engine(transformer_lib.from_params(config, placed), None, MESH_ENGINE, mesh=mesh)
  got = [o.token_ids for o in engine.generate(_prompts(2, length=20), MESH_GREEDY)]
  assert got == _single_device_greedy(case, root)
  m = mesh.shape["model"]
  shard = placed["layers"][0]["experts_gate"].addressable_shards[0].data
  report = sharding.memory_report(config, sharding.mesh_shape(mesh)).summary()
  if config.num_experts % m == 0:
    assert shard.shape == (config.num_experts // m, config.hidden_size, config.expert_size)
    assert "expert parallelism" in report
  else:
    assert shard.shape == (config.num_experts, config.hidden_size, config.expert_size // m)
    assert "tensor parallelism within experts" in report


def test_moe_presets_count_active_experts_only():
  from ridgeline.configs import models
  from ridgeline.engine import roofline
  qwen = models.get("qwen3-30b-a3b")
  mixtral = models.get("mixtral-8x7b")
  # The published sizes: 30.5B total / 3.3B active; 46.7B / 12.9B.
  assert round(qwen.num_params() / 1e9, 1) == 30.5
  assert round(qwen.num_params(active=True) / 1e9, 1) == 3.4
  assert round(mixtral.num_params() / 1e9, 1) == 46.7
  assert round(mixtral.num_params(active=True) / 1e9, 1) == 12.9
  one, many = roofline.decode_cost(qwen, [256]), roofline.decode_cost(qwen, [256] * 64)
  every_expert = roofline.weight_bytes(qwen)
  # One token reads its 8 experts per layer, 64 tokens nearly all 128 of them.
  assert one.weight_bytes < 0.15 * every_expert < many.weight_bytes
  assert many.weight_bytes == pytest.approx(every_expert, rel=0.05)
  # FLOPs: 2 per active weight per token (plus attention), not per expert weight.
  assert one.flops == pytest.approx(2 * qwen.num_params(active=True), rel=0.1)


def test_qwen3_moe_gguf_as_llama_cpp_writes_it(root, tmp_path):
  """The same weights written as llama.cpp's convert_hf_to_gguf.py lays out a
  qwen3moe file (experts [E, F, D] numpy, i.e. ne = [D, F, E]; no q/k permutation)
  come back as the tree the HF converter made."""
  import gguf
  from ridgeline.model import params as params_lib
  from ridgeline.model.convert.gguf import load_gguf
  config, params = load_hf(_saved("qwen3_moe", root)[0])
  names = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
           "o": "attn_output", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
           "mlp_norm": "ffn_norm", "router": "ffn_gate_inp", "experts_gate": "ffn_gate_exps",
           "experts_up": "ffn_up_exps", "experts_down": "ffn_down_exps"}
  writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3moe")
  for key, value in [("block_count", config.num_layers), ("context_length", 512),
                     ("embedding_length", config.hidden_size),
                     ("feed_forward_length", config.intermediate_size),
                     ("expert_feed_forward_length", config.expert_size),
                     ("expert_count", config.num_experts),
                     ("expert_used_count", config.num_experts_per_tok),
                     ("attention.head_count", config.num_heads),
                     ("attention.head_count_kv", config.num_kv_heads),
                     ("attention.key_length", config.head_dim)]:
    writer.add_uint32(f"qwen3moe.{key}", value)
  writer.add_float32("qwen3moe.rope.freq_base", config.rope_theta)
  writer.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
  writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
  flat = params_lib.flatten(params)
  for name, w in flat.items():
    parts = name.split(".")
    if parts[0] == "layers":
      gname = f"blk.{parts[1]}.{names[parts[2]]}.weight"
    else:
      gname = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
               "lm_head": "output.weight"}[parts[0]]
    w = np.asarray(w)
    if w.ndim >= 2 and parts[0] != "embed":
      w = np.swapaxes(w, -1, -2)  # ours [in, out] -> torch/llama.cpp [out, in]
    writer.add_tensor(gname, np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  got_config, got = load_gguf(tmp_path / "m.gguf")
  # llama.cpp's qwen3moe graph always renormalises (transformers reads it so too).
  assert got_config == config.replace(name=got_config.name, norm_topk_prob=True,
                                      max_position_embeddings=512)
  for name, w in params_lib.flatten(got).items():
    np.testing.assert_array_equal(w, flat[name], err_msg=name)


def test_sliding_window_releases_pages_behind_the_window(root):
  """Mistral (every layer slides): a sequence far longer than the window holds only
  the pages the window still covers, and its greedy tokens stay transformers'."""
  path, hf_model = _saved("mistral_sliding", root)
  config, params = load_hf(path)
  assert config.kv_window == WINDOW
  model = transformer_lib.from_params(config, params)
  engine = Engine(model, None, EngineConfig(page_size=8, num_pages=64, max_batch=4,
                                            prefill_chunk=24, max_prefill_batch=2))
  prompt = _prompts(1, length=40)[0]
  rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=48))
  most = 0
  while engine.has_unfinished():
    engine.step()
    most = max(most, engine.scheduler.allocator.num_used)
  out = engine.get_output(rid)
  # 88 tokens would need 11 pages; the window (16) spans at most 3 of 8 tokens, plus
  # the page being written and one a step ahead.
  assert most <= 5, most
  assert out.token_ids == hf_greedy(hf_model, prompt, 48)
  engine.release(rid)
  assert engine.num_free_pages() == 64
