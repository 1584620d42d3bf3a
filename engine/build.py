"""One way to build an engine: an `EngineSpec`, and its `build()`.

The command line turns its flags into a spec, the fleet ships one to each of its
Ray actors (a spec is a frozen dataclass of plain values, so it pickles, and Ray
rebuilds the engine from it after a crash), and `Engine.from_checkpoint` is a spec
with a checkpoint. So a model is loaded, quantized, placed on its mesh and given
its device peaks in one place, the same way whoever asks.

```python
engine = EngineSpec(checkpoint="ckpt/", config=EngineConfig(max_batch=32)).build()
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ridgeline.engine.config import EngineConfig


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """What an engine is built from.

  checkpoint / preset / cache_dir / dtype / seed / quantize: as
    ridgeline.engine.loading.load_model (a preset has random weights from `seed`:
    every process that builds the spec gets the same ones; neither checkpoint nor
    preset: the default model, converted once under `cache_dir`).
  config: the EngineConfig.
  compilation_cache_dir: JAX's persistent compilation cache (process-wide), so a
    restarted worker or a second run loads its compiled steps instead of
    compiling them again; None leaves JAX's setting alone.
  tokenizer_gguf: a preset's tokenizer (its vocabulary sizes the preset).
  mesh: a Mesh (model/sharding.make_mesh), or its shape as text ('data=2,model=4',
    made where the spec is built, so it ships); None: one device.
  peaks: the device peaks the planner sizes steps from (default: the device's,
    process 0's in a multi-process run, see `agreed_peaks`).
  """

  checkpoint: str | None = None
  preset: str | None = None
  cache_dir: str | None = None
  dtype: str | None = None
  seed: int = 0
  config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
  compilation_cache_dir: str | None = None
  tokenizer_gguf: str | None = None
  quantize: str | None = None  # load_model's `quantize` ("int8", "int4", "fp8")
  mesh: Any = None
  peaks: Any = None

  def with_default_checkpoint(self) -> "EngineSpec":
    """The spec with the default model converted (once, here) and named as its
    checkpoint, so the processes it ships to do not each convert it."""
    if self.checkpoint is not None or self.preset is not None:
      return self
    from ridgeline.engine.loading import ensure_default_checkpoint
    return dataclasses.replace(self, checkpoint=str(ensure_default_checkpoint(self.cache_dir)))

  def build(self):
    from ridgeline.engine.engine import Engine
    from ridgeline.engine import loading  # orbax is only needed when restoring
    if self.compilation_cache_dir:
      from ridgeline.engine.runner import enable_compilation_cache
      enable_compilation_cache(self.compilation_cache_dir)
    mesh = self.mesh
    if isinstance(mesh, str):
      from ridgeline.model import sharding
      mesh = sharding.make_mesh(mesh)
    if self.preset and self.tokenizer_gguf:
      from flax import nnx
      from ridgeline.configs import models
      from ridgeline.model import transformer as transformer_lib
      from ridgeline.model.tokenizer import Tokenizer
      tokenizer = Tokenizer.from_gguf(self.tokenizer_gguf)
      config = models.get(self.preset).replace(vocab_size=tokenizer.vocab_size)
      model = transformer_lib.Transformer(config, rngs=nnx.Rngs(self.seed))
      if self.quantize:
        config, params = loading.quantize_weights(config, transformer_lib.to_params(model),
                                                  self.quantize)
        model = transformer_lib.from_params(config, params)
    else:
      model, tokenizer = loading.load_model(self.checkpoint, self.preset, self.cache_dir,
                                            self.dtype, seed=self.seed, mesh=mesh,
                                            quantize=self.quantize)
    return Engine(model, tokenizer, self.config, peaks=self.peaks or agreed_peaks(), mesh=mesh)


def agreed_peaks():
  """Device peaks every process agrees on: the planner sizes steps from them, and
  processes that planned different steps would wait on each other forever. Table
  entries are identical everywhere; measured ones (CPUs) are process 0's. In one
  process: the first device's (the Engine's own default)."""
  import jax
  import numpy as np
  from ridgeline.engine import roofline
  from jax.experimental import multihost_utils
  peaks = roofline.device_peaks(jax.local_devices()[0])
  if jax.process_count() == 1 or not peaks.measured:
    return peaks
  names = sorted(peaks.flops)
  values = np.asarray([peaks.flops[n] for n in names] + [peaks.bandwidth, peaks.memory_bytes],
                      np.float32)
  values = [float(v) for v in multihost_utils.broadcast_one_to_all(values)]
  return dataclasses.replace(peaks, flops=dict(zip(names, values)), bandwidth=values[-2],
                             memory_bytes=values[-1])
