"""Tests for the GGUF converter (`model/convert/gguf.py`).

Two kinds of evidence:

* Small files written here with `gguf.GGUFWriter`, laid out the way llama.cpp's
  converter lays them out (q/k rows interleaved for `llama`, not for `qwen2`), in
  every tensor type we can produce. Quantization works row by row and the q/k
  interleave moves whole rows, so "quantize, then interleave" equals "interleave,
  then quantize": the exact expectation for a quantized file is the dequantized
  Hugging Face layout, with no permutation code in the test.
* The default model's real GGUF, compared with what transformers' own GGUF loader
  makes of the same file (an independent implementation of the names, the
  transposes and the q/k un-interleave).
"""

from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest

from ridgeline.configs import models
from ridgeline.model import params as params_lib
from ridgeline.model.config import ModelConfig, RopeScaling
from ridgeline.model.convert.gguf import llama3_freq_factors, load_gguf

Q = gguf.GGMLQuantizationType

# hidden 256 lets the K-quants (256-element blocks) cover every projection but `o`
# (whose rows are heads * head_dim = 64 long); head_dim != hidden / heads checks that
# head_dim comes from the metadata, not from a division.
TINY = ModelConfig(
    name="tiny-gguf", vocab_size=256, hidden_size=256, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, intermediate_size=512, rope_theta=10000.0,
    rms_norm_eps=1e-6, max_position_embeddings=512)

# Canonical leaf -> GGUF name, written out independently of the converter's table.
GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                "lm_head": "output.weight"}
LAYER_NAMES = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight",
    "v": "attn_v.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias", "o": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}
LINEAR = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def gguf_name(name: str) -> str:
  parts = name.split(".")
  if parts[0] == "layers":
    return f"blk.{parts[1]}.{LAYER_NAMES[parts[2]]}"
  return GLOBAL_NAMES[parts[0]]


def hf_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights in Hugging Face layout ([out, in] projections)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in params_lib.flatten(params_lib.param_shapes(config)).items():
    leaf = name.rsplit(".", 1)[-1]
    shape = shape[::-1] if leaf in LINEAR else shape
    scale = 1.0 if leaf.endswith("norm") else 0.1
    out[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return out


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute` (rotate-half -> GPT-J)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
  """Array and raw_dtype for GGUFWriter.add_tensor."""
  if w.dtype == np.uint8:  # already block bytes
    return w, qtype
  if qtype == Q.F32:
    return w, None
  if qtype == Q.F16:
    return w.astype(np.float16), None
  return gguf.quants.quantize(w, qtype), qtype


def expected_after_roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
  """What a lossless converter must return for `w` stored as `qtype`."""
  if w.dtype == np.uint8:
    return gguf.quants.dequantize(w, qtype)
  if qtype == Q.F32:
    return w
  data, raw = encode(w, qtype)
  return gguf.quants.dequantize(data, raw or qtype)


def write_gguf(path, config: ModelConfig, weights: dict[str, np.ndarray], *,
               arch: str = "llama", qtype: Q = Q.F32, permute: bool = True,
               skip: tuple[str, ...] = (), extra_tensors: dict | None = None,
               metadata: dict | None = None, vocab_size_key: bool = True) -> str:
  """Writes `weights` (HF layout, keyed by canonical name) as llama.cpp would.

  2-D tensors go in as `qtype` where their rows fit its block size (F32 otherwise);
  1-D tensors (norms, biases) stay F32, as llama.cpp keeps them.
  """
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name(config.name)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  if vocab_size_key:
    writer.add_vocab_size(config.vocab_size)
  writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
  for key, value in (metadata or {}).items():
    if isinstance(value, str):
      writer.add_string(key, value)
    elif isinstance(value, int):
      writer.add_uint32(key, value)
    else:
      writer.add_float32(key, value)
  for name, w in weights.items():
    if gguf_name(name) in skip:
      continue
    leaf = name.rsplit(".", 1)[-1]
    if permute and leaf in ("q", "q_bias"):
      w = llamacpp_permute(w, config.num_heads)
    elif permute and leaf in ("k", "k_bias"):
      w = llamacpp_permute(w, config.num_kv_heads)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    use = qtype if (w.ndim == 2 and (w.dtype == np.uint8 or w.shape[1] % block == 0)) else Q.F32
    data, raw = encode(w, use)
    writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
  for name, w in (extra_tensors or {}).items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def expected_tree(weights: dict[str, np.ndarray], qtype: Q) -> dict[str, np.ndarray]:
  """Canonical flat tree the converter must produce for `write_gguf(weights, qtype)`."""
  out = {}
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  for name, w in weights.items():
    fits = w.ndim == 2 and (w.dtype == np.uint8 or w.shape[1] % block == 0)
    w = expected_after_roundtrip(w, qtype if fits else Q.F32)
    out[name] = w.T if name.rsplit(".", 1)[-1] in LINEAR else w
  return out


def assert_tree_equal(params, expected: dict[str, np.ndarray], config: ModelConfig):
  params_lib.check(params, config)
  flat = params_lib.flatten(params)
  assert flat.keys() == expected.keys()
  for name, want in expected.items():
    np.testing.assert_array_equal(flat[name], want, err_msg=name)


# Small files ------------------------------------------------------------------------


def test_f32_llama_is_exact_and_config_matches(tmp_path):
  weights = hf_weights(TINY)
  path = write_gguf(tmp_path / "tiny.gguf", TINY, weights)
  config, params = load_gguf(path)
  assert config == TINY  # float32 metadata (1e-6, 10000.0) comes back as written
  assert_tree_equal(params, expected_tree(weights, Q.F32), config)
  for leaf in params_lib.flatten(params).values():
    assert leaf.dtype == np.float32 and leaf.flags.c_contiguous and leaf.flags.writeable


# Largest error allowed against the original weights, as a fraction of each tensor's
# largest magnitude: about half a quantization step of the type.
QUANT_TOLERANCE = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
                   Q.Q4_0: 0.1, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype, tolerance", [
    pytest.param(q, tol, id=q.name) for q, tol in QUANT_TOLERANCE.items()])
def test_quantized_llama(tmp_path, qtype, tolerance):
  weights = hf_weights(TINY)
  path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", TINY, weights, qtype=qtype)
  # A file whose matrices are all F16 or BF16 loads in that dtype by default.
  own = {Q.F16: "float16", Q.BF16: "bfloat16"}.get(qtype, "float32")
  assert load_gguf(path)[0].param_dtype == own
  config, params = load_gguf(path, "float32")
  assert config == TINY
  # Bit-exact against gguf's own dequantization of the same blocks ...
  assert_tree_equal(params, expected_tree(weights, qtype), config)
  # ... and close to the original weights, so the rows are in the right places.
  flat = params_lib.flatten(params)
  for name, w in weights.items():
    want = w.T if name.rsplit(".", 1)[-1] in LINEAR else w
    err = np.abs(flat[name] - want).max()
    assert err <= tolerance * np.abs(want).max(), (name, err)


# Byte offsets of the float16 scales in each K-quant block (the rest is free-form bits).
K_QUANT_F16_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                       Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(K_QUANT_F16_OFFSETS), ids=lambda q: q.name)
def test_k_quants_llama(tmp_path, qtype):
  """The gguf package cannot quantize K-quants, so random valid blocks stand in."""
  rng = np.random.default_rng(1)
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  weights = hf_weights(TINY)
  for name, w in list(weights.items()):
    if w.ndim == 2 and w.shape[1] % block == 0:
      rows, blocks = w.shape[0], w.shape[1] // block
      raw = rng.integers(0, 256, (rows, blocks, type_size), dtype=np.uint8)
      for offset in K_QUANT_F16_OFFSETS[qtype]:
        scale = rng.uniform(-0.05, 0.05, (rows, blocks, 1)).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8)
      weights[name] = raw.reshape(rows, blocks * type_size)
  assert weights["layers.0.q"].dtype == np.uint8 and weights["layers.0.o"].dtype == np.float32
  path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", TINY, weights, qtype=qtype)
  config, params = load_gguf(path)
  expected = expected_tree(weights, qtype)
  assert np.abs(expected["layers.0.q"]).max() > 0
  assert_tree_equal(params, expected, config)


def test_qwen2_with_bias_tied_and_not_permuted(tmp_path):
  config = TINY.replace(name="tiny-qwen2", qkv_bias=True, tie_word_embeddings=True)
  weights = hf_weights(config)
  path = write_gguf(tmp_path / "qwen2.gguf", config, weights, arch="qwen2", permute=False,
                    vocab_size_key=False)
  loaded, params = load_gguf(path)
  assert loaded == config
  assert "lm_head" not in params and "q_bias" in params["layers"][0]
  assert_tree_equal(params, expected_tree(weights, Q.F32), loaded)


def test_bfloat16_output(tmp_path):
  weights = hf_weights(TINY)
  config, params = load_gguf(write_gguf(tmp_path / "t.gguf", TINY, weights), "bfloat16")
  assert config.param_dtype == config.compute_dtype == "bfloat16"
  q = params["layers"][1]["q"]
  assert q.dtype.name == "bfloat16"
  np.testing.assert_allclose(q.astype(np.float32), weights["layers.1.q"].T, rtol=1e-2, atol=1e-3)


# RoPE scaling --------------------------------------------------------------------------

# head_dim 128 at theta 5e5 puts several frequencies in llama3's blend band, as in Llama 3.
ROPE = TINY.replace(num_heads=2, num_kv_heads=1, head_dim=128, rope_theta=500000.0)


def llamacpp_rope_freqs(theta, head_dim, factor, low, high, ctx) -> np.ndarray:
  """llama.cpp's LlamaModel.generate_extra_tensors, transcribed loop for loop."""
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < ctx / high:
      out.append(1.0)
    elif wavelen > ctx / low:
      out.append(factor)
    else:
      smooth = (ctx / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("config, scaling", [
    (ROPE, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),    # Llama 3.1
    (ROPE.replace(head_dim=64, num_heads=4, num_kv_heads=2),
     RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),          # Llama 3.2 1B/3B
    (ROPE, RopeScaling("llama3", 16.0, 2.0, 8.0, 8192)),    # inferred, not assumed
    (TINY, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),     # <2 blended: defaults checked
], ids=["llama3.1", "llama3.2", "nondefault", "few-blended"])
def test_llama3_scaling_from_rope_freqs(tmp_path, config, scaling):
  freqs = llamacpp_rope_freqs(config.rope_theta, config.head_dim, scaling.factor,
                              scaling.low_freq_factor, scaling.high_freq_factor,
                              scaling.original_max_position_embeddings)
  np.testing.assert_allclose(
      llama3_freq_factors(scaling, config.rope_theta, config.head_dim), freqs, rtol=1e-6)
  path = write_gguf(tmp_path / "r.gguf", config, hf_weights(config),
                    extra_tensors={"rope_freqs.weight": freqs})
  loaded, _ = load_gguf(path)
  assert loaded.rope_scaling == scaling
  assert loaded == config.replace(rope_scaling=scaling)


def test_llama3_scaling_uses_original_context_from_metadata(tmp_path):
  scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 4096)
  freqs = llamacpp_rope_freqs(ROPE.rope_theta, 128, 8.0, 1.0, 4.0, 4096)
  path = write_gguf(tmp_path / "r.gguf", ROPE, hf_weights(ROPE),
                    extra_tensors={"rope_freqs.weight": freqs},
                    metadata={"llama.rope.scaling.original_context_length": 4096})
  assert load_gguf(path)[0].rope_scaling == scaling


def test_rope_freqs_not_llama3_is_rejected(tmp_path):
  freqs = np.random.default_rng(0).uniform(1, 8, ROPE.head_dim // 2).astype(np.float32)
  path = write_gguf(tmp_path / "r.gguf", ROPE, hf_weights(ROPE),
                    extra_tensors={"rope_freqs.weight": freqs})
  with pytest.raises(ValueError, match="rope_freqs"):
    load_gguf(path)


def test_linear_and_unsupported_rope_scaling(tmp_path):
  weights = hf_weights(TINY)
  linear = write_gguf(tmp_path / "lin.gguf", TINY, weights, metadata={
      "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
  assert load_gguf(linear)[0].rope_scaling == RopeScaling(type="linear", factor=4.0)
  yarn = write_gguf(tmp_path / "yarn.gguf", TINY, weights, metadata={
      "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
  with pytest.raises(ValueError, match="yarn"):
    load_gguf(yarn)


# Errors ----------------------------------------------------------------------------------


def test_unknown_architecture(tmp_path):
  path = write_gguf(tmp_path / "g.gguf", TINY, hf_weights(TINY), arch="gptneox")
  with pytest.raises(ValueError, match="gptneox") as e:
    load_gguf(path)
  assert "llama" in str(e.value) and "qwen2" in str(e.value)


def test_missing_layer_tensor(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", TINY, hf_weights(TINY),
                    skip=("blk.1.attn_k.weight", "blk.0.ffn_up.weight"))
  with pytest.raises(ValueError) as e:
    load_gguf(path)
  message = str(e.value)
  assert "blk.1.attn_k.weight" in message and "blk.0.ffn_up.weight" in message
  assert path in message


def test_unexpected_tensor_is_rejected(tmp_path):
  path = write_gguf(tmp_path / "x.gguf", TINY, hf_weights(TINY),
                    extra_tensors={"blk.0.ffn_gate_shexp.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match="blk.0.ffn_gate_shexp.weight"):
    load_gguf(path)


def test_wrong_shape_is_rejected(tmp_path):
  weights = hf_weights(TINY)
  weights["layers.0.gate"] = weights["layers.0.gate"][:256]  # [out, in]: half the rows
  with pytest.raises(ValueError, match=r"wrong shapes: layers\.0\.gate"):
    load_gguf(write_gguf(tmp_path / "s.gguf", TINY, weights))


# The default model against transformers ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_state_dict(smollm2_gguf):
  """transformers' reading of the same file: {hf_name: float32 numpy array}.

  `AutoModelForCausalLM.from_pretrained(gguf_file=...)` insists on `accelerate`,
  which is not a test dependency, so this calls the loader underneath it directly:
  the same name map, dequantization and q/k un-permute, minus the module plumbing.
  """
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  directory, name = os.path.split(smollm2_gguf)
  hf_config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
  with torch.device("meta"):
    skeleton = transformers.AutoModelForCausalLM.from_config(hf_config)
  tensors = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=skeleton,
                                 torch_dtype=torch.float32)["tensors"]
  return hf_config, {k: v.numpy() for k, v in tensors.items()}


def test_default_model_config_is_the_preset(smollm2):
  config, _ = smollm2
  assert config.replace(name="smollm2-135m") == models.get("smollm2-135m")


def test_default_model_matches_transformers(smollm2, hf_state_dict):
  config, params = smollm2
  hf_config, hf = hf_state_dict
  assert (hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.head_dim,
          hf_config.tie_word_embeddings) == (config.num_heads, config.num_kv_heads,
                                             config.head_dim, config.tie_word_embeddings)
  assert "lm_head" not in params
  pairs = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
  hf_layer = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "mlp_norm": "post_attention_layernorm", "gate": "mlp.gate_proj",
              "up": "mlp.up_proj", "down": "mlp.down_proj"}
  for i in (0, config.num_layers - 1):
    pairs.update({f"layers.{i}.{leaf}": f"model.layers.{i}.{hf_name}.weight"
                  for leaf, hf_name in hf_layer.items()})
  flat = params_lib.flatten(params)
  for name, hf_name in pairs.items():
    want = hf[hf_name].T if name.rsplit(".", 1)[-1] in LINEAR else hf[hf_name]
    np.testing.assert_allclose(flat[name], want, rtol=0, atol=1e-6, err_msg=name)
