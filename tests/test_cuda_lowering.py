"""Every step variant lowers for CUDA, on this CPU (jax.export with platforms=["cuda"]).

The GPU path (the Pallas decode kernel, GPU block sizes, 8-bit pools read by the
kernel) runs only where a GPU is lent; a shape or dtype that only it rejects must
fail here, in CI, not on a lent H200.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine import sampler_inputs
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import transformer as transformer_lib

CONFIG = EngineConfig(page_size=8, num_pages=64, max_model_len=64, max_batch=8,
                      prefill_chunk=32, max_prefill_batch=4)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_every_step_variant_lowers_for_cuda(kv_dtype):
  model = transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))
  model.attention_impl = "pallas_gpu"
  engine = Engine(model, None, dataclasses.replace(CONFIG, kv_dtype=kv_dtype))
  runner = engine.runner
  shapes = engine.config.step_shapes()
  samplers = {runner.sample_rows(s) for s in shapes}
  assert len(shapes) + len(samplers) == engine.config.max_step_variants()
  for shape in shapes:
    model_pass, sampler = runner.export(shape)
    assert model_pass.platforms == sampler.platforms == ("cuda",)
    if shape.decode:  # decode rows run the Pallas (Triton) kernel
      assert "xla.gpu.triton" in model_pass.mlir_module(), shape
  # The sampler variants a workload adds: a long penalty history, many banned
  # ids (an allowed-token mask is always there).
  vocab = model.config.vocab_size
  params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                          allowed_token_ids=[4, 5, 6], seed=1)
  history = sampler_inputs.History(np.arange(5000, dtype=np.int32) % vocab,
                             np.arange(3, dtype=np.int32), inflight_row=0)
  row = sampler_inputs.SampleRow(params, 1, 3, banned=list(range(12)), history=history)
  shape = shapes[-1]
  sampler = sampler_inputs.inputs_for([row], runner.sample_rows(shape), vocab)
  assert sampler.history_rows.shape[0] > sampler_inputs.HISTORY_TOKENS
  assert sampler.banned.shape[1] > sampler_inputs.BAN_WIDTH and sampler.allowed is not None
  assert runner.export(shape, sampler=sampler)[1].platforms == ("cuda",)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_the_host_tiers_copies_lower_for_cuda(kv_dtype):
  """The host KV tier's gather into pinned host memory and its scatter back."""
  model = transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))
  engine = Engine(model, None, dataclasses.replace(CONFIG, kv_dtype=kv_dtype,
                                                   host_kv_cache_bytes=1 << 20))
  gather, scatter = engine.runner.export_copies(width=4)
  assert gather.platforms == scatter.platforms == ("cuda",)
  assert "pinned_host" in str(gather.out_shardings_hlo) or "pinned_host" in gather.mlir_module()
