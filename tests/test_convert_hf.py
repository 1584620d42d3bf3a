"""Hugging Face safetensors converter: weights and config against transformers itself.

Models are tiny random transformers models saved with `save_pretrained`, so the
files are exactly what the hub would serve (single file, sharded with an index,
bf16). Logit parity lives in another test file; this one checks the tensors.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from ridgeline.model import params as params_lib
from ridgeline.model.config import RopeScaling
from ridgeline.model.convert import hf

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# Our flat name -> (HF name, transposed); written out independently of hf.py's table.
LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True), "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True), "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False), "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True), "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}


def save_model(path, model_cls, config, dtype=torch.float32, **save_kwargs):
  torch.manual_seed(0)
  model = model_cls(config).to(dtype)
  with torch.no_grad():  # norms start at 1 and biases at 0; make every tensor distinct
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(path, safe_serialization=True, **save_kwargs)
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_matches_state_dict(params, state, config):
  flat = params_lib.flatten(params)
  for name, value in flat.items():
    parts = name.split(".")
    if parts[0] == "layers":
      hf_name, transpose = LAYER_NAMES[parts[2]]
      hf_name = f"model.layers.{parts[1]}.{hf_name}"
    else:
      hf_name, transpose = {"embed": ("model.embed_tokens.weight", False),
                            "final_norm": ("model.norm.weight", False),
                            "lm_head": ("lm_head.weight", True)}[parts[0]]
    want = state[hf_name].float().numpy()
    if transpose:
      want = want.T
    assert value.dtype == config.weight_dtype, name
    assert isinstance(value, np.ndarray) and value.flags.c_contiguous, name
    np.testing.assert_array_equal(value.astype(np.float32), want, err_msg=name)
  assert ("lm_head" in flat) == (not config.tie_word_embeddings)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """Untied GQA Llama 3.1-style model with llama3 RoPE scaling, one safetensors file."""
  path = tmp_path_factory.mktemp("llama")
  config = transformers.LlamaConfig(
      **SMALL, rms_norm_eps=1e-5, tie_word_embeddings=False,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
      rope_theta=500000.0)
  state = save_model(path, transformers.LlamaForCausalLM, config)
  return path, state


@pytest.fixture(scope="module")
def qwen2_bf16_sharded_dir(tmp_path_factory):
  """Tied Qwen2 (qkv bias) saved in bf16 across several shards with an index."""
  path = tmp_path_factory.mktemp("qwen2")
  config = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1e6)
  state = save_model(path, transformers.Qwen2ForCausalLM, config, dtype=torch.bfloat16,
                     max_shard_size="50KB")
  return path, state


def test_llama_weights_and_config(llama_dir):
  path, state = llama_dir
  assert os.path.isfile(path / "model.safetensors")
  config, params = hf.load_hf(path)
  assert (config.vocab_size, config.hidden_size, config.num_layers) == (256, 64, 2)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
  assert config.intermediate_size == 96
  assert config.rope_theta == 500000.0
  assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)
  assert config.rms_norm_eps == 1e-5
  assert not config.tie_word_embeddings and not config.qkv_bias
  assert config.max_position_embeddings == 512
  assert config.param_dtype == config.compute_dtype == "float32"
  params_lib.check(params, config)
  assert_matches_state_dict(params, state, config)


def test_qwen2_bf16_sharded_weights_and_config(qwen2_bf16_sharded_dir):
  path, state = qwen2_bf16_sharded_dir
  index = json.loads((path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2  # really sharded
  with safe_open(str(path / sorted(set(index["weight_map"].values()))[0]), "numpy") as f:
    assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"

  config, params = hf.load_hf(path)  # the weights' own dtype by default
  assert config.qkv_bias and config.tie_word_embeddings
  assert config.rope_theta == 1e6 and config.rope_scaling is None
  assert config.param_dtype == "bfloat16"
  assert params["layers"][0]["q_bias"].shape == (64,)
  assert params["layers"][1]["k_bias"].shape == (32,)
  assert_matches_state_dict(params, state, config)  # bf16 -> bf16: bit for bit

  config32, params32 = hf.load_hf(path, dtype="float32")  # bf16 -> f32 is exact too
  assert config32.param_dtype == "float32"
  assert_matches_state_dict(params32, state, config32)


def test_raw_reader_matches_safetensors(qwen2_bf16_sharded_dir):
  """The header-parsing fallback (for safetensors releases without numpy bf16)."""
  path, _ = qwen2_bf16_sharded_dir
  for filename in sorted(path.glob("*.safetensors"))[:2]:
    with safe_open(str(filename), framework="numpy") as f:
      for name in f.keys():
        want = f.get_tensor(name)
        got = hf._read_raw(str(filename), name)
        assert got.dtype == ml_dtypes.bfloat16 and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_reader_falls_back_when_safetensors_cannot_make_the_dtype(qwen2_bf16_sharded_dir):
  path, _ = qwen2_bf16_sharded_dir
  filename = str(sorted(path.glob("*.safetensors"))[0])

  class OldSafetensors:  # what releases before numpy-bf16 support did
    def get_tensor(self, name):
      raise TypeError("data type 'bfloat16' not understood")

  with safe_open(filename, framework="numpy") as f:
    name = next(iter(f.keys()))
    want = f.get_tensor(name)
  got = hf._read_tensor(OldSafetensors(), filename, name)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_missing_shard_file_is_named(qwen2_bf16_sharded_dir, tmp_path):
  path, _ = qwen2_bf16_sharded_dir
  copy = tmp_path / "copy"
  copy.mkdir()
  for f in path.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  victim = sorted(copy.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(FileNotFoundError, match=victim.name):
    hf.load_hf(copy)


def test_missing_tensor_is_named_by_its_hf_name(llama_dir, tmp_path):
  path, _ = llama_dir
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  del tensors["model.layers.1.mlp.up_proj.weight"]
  del tensors["lm_head.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError) as info:
    hf.load_hf(tmp_path)
  message = str(info.value)
  assert str(tmp_path) in message
  assert "model.layers.1.mlp.up_proj.weight" in message and "lm_head.weight" in message


def test_unexpected_tensor_is_rejected(llama_dir, tmp_path):
  """An o_proj bias we would drop would change the logits: refuse it."""
  path, _ = llama_dir
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # ignored
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"o_proj\.bias") as info:
    hf.load_hf(tmp_path)
  assert "inv_freq" not in str(info.value)


def test_config_that_does_not_match_the_weights_is_named(llama_dir, tmp_path):
  path, _ = llama_dir
  for f in path.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  hf_config = json.loads((path / "config.json").read_text())
  hf_config["intermediate_size"] = 80
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\)"):
    hf.load_hf(tmp_path)


def test_truncated_safetensors_file_is_named(llama_dir, tmp_path):
  path, _ = llama_dir
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  data = (path / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'}"):
    hf.load_hf(tmp_path)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["LlamaForCausalLM"], **SMALL}))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_hf(tmp_path)


# config_from_hf on hand-written dicts (every config.json layout seen in the wild) --

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL}


def test_unknown_architecture_names_it_and_the_supported_ones():
  with pytest.raises(ValueError) as info:
    hf.config_from_hf({**BASE, "architectures": ["GPTNeoXForCausalLM"]})
  message = str(info.value)
  assert "GPTNeoXForCausalLM" in message
  assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message


def test_defaults_and_model_type_fallback():
  hf_config = {k: v for k, v in BASE.items() if k not in ("architectures",
                                                          "num_key_value_heads")}
  config = hf.config_from_hf(hf_config)
  assert config.num_kv_heads == 4 and config.head_dim == 16  # MHA, hidden / heads
  assert config.rope_theta == 10000.0 and config.rope_scaling is None
  assert config.param_dtype == "float32"
  assert hf.config_from_hf({**BASE, "head_dim": 32}).head_dim == 32
  assert hf.config_from_hf({**BASE, "torch_dtype": "bfloat16"}).param_dtype == "bfloat16"
  assert hf.config_from_hf({**BASE, "dtype": "bfloat16"}, dtype="float32").param_dtype == (
      "float32")
  with pytest.raises(ValueError, match="hidden_size"):
    hf.config_from_hf({k: v for k, v in BASE.items() if k != "hidden_size"})


@pytest.mark.parametrize("rope_fields, want_theta, want_scaling", [
    ({"rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     5e5, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     1e4, RopeScaling(type="linear", factor=2.0)),
    ({"rope_theta": 1e6, "rope_scaling": None}, 1e6, None),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, 1e5, None),
    ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 3e4}},
     3e4, RopeScaling(type="linear", factor=4.0)),
], ids=["llama3_old", "linear_old_type_key", "none", "default_v5", "linear_v5"])
def test_rope_layouts(rope_fields, want_theta, want_scaling):
  config = hf.config_from_hf({**BASE, **rope_fields})
  assert config.rope_theta == want_theta
  assert config.rope_scaling == want_scaling


def test_unsupported_features_are_refused():
  with pytest.raises(ValueError, match="yarn"):
    hf.config_from_hf({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="attention_bias"):
    hf.config_from_hf({**BASE, "attention_bias": True})
  with pytest.raises(ValueError, match="mlp_bias"):
    hf.config_from_hf({**BASE, "mlp_bias": True})
  with pytest.raises(ValueError, match="gelu"):
    hf.config_from_hf({**BASE, "hidden_act": "gelu"})


def test_qwen2_and_mistral_configs():
  qwen = hf.config_from_hf(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
                           .to_dict() | {"architectures": ["Qwen2ForCausalLM"]})
  assert qwen.qkv_bias and qwen.tie_word_embeddings and qwen.max_position_embeddings == 512
  mistral = transformers.MistralConfig(**SMALL, sliding_window=128).to_dict()
  config = hf.config_from_hf(mistral | {"architectures": ["MistralForCausalLM"]})
  assert not config.qkv_bias
  # The window limits attention (every layer slides), not the context.
  assert config.max_position_embeddings == 512 and config.sliding_window == 128
  assert config.layer_window(0) == 128
  mistral["sliding_window"] = None
  unwindowed = hf.config_from_hf(mistral)
  assert unwindowed.max_position_embeddings == 512 and unwindowed.layer_window(0) is None
