"""The step's executables: compiled once per shape, kept by key, warmed up ahead of time.

A step runs as two executables (engine/runner.py): the model pass and the
sampler. Shapes come from a fixed set (`EngineConfig.step_shapes`): decode rows
and prefill tokens padded to buckets, block tables at full width; the sampler's
variants follow the number of sample rows. Each compiled executable is kept by
its key (`_model_key`, `_sampler_key`: the shapes that make it a variant), and
a step looks its key up before it runs (one dict lookup a pass).

`warmup()` compiles the standard shapes ahead of time, in parallel threads (XLA
compiles with the GIL released), through JAX's persistent compilation cache
when it is enabled, or (background=True) the cover shapes first and the rest as
they pay for themselves: a step whose own shape is not compiled runs padded
into a compiled one (`shape_for`) until the scheduler asks for its own
(`compile_later`). `export` lowers a step for another platform (a CPU lowers
for CUDA), so a shape only the GPU path rejects fails in a CPU test.

`StepCompiler` is a part of `Runner`, kept apart: it reads the runner's jitted
passes (`_model_jit`, `_sample_jit`), its state and pools, its config and
`_replicated` sharding, and calls `with_masks`; `_init_compiler` sets up its own
attributes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ridgeline.engine import sampler_inputs
from ridgeline.engine import step_inputs
from ridgeline.engine.config import StepShape
from ridgeline.engine.sampler_inputs import SamplerInputs
from ridgeline.engine.step_inputs import ModelInputs


def enable_compilation_cache(path: str) -> None:
  """Persists compiled executables under `path` (called by scripts, not the library)."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# A variant that loads from the persistent compilation cache takes ~0.4 s (its
# lowering and the load); compiling one takes 1-3 s on the 2-core CPU host.
CACHED_COMPILE_SECONDS = 0.8


class StepCompiler:
  """Compiles and keeps the runner's executables (see the module docstring)."""

  def _init_compiler(self) -> None:
    # Compiled variants by key (`_model_key`, `_sampler_key`); `compilations`
    # counts them (a key two threads compiled at once counts once).
    self._compiled: dict[tuple, object] = {}
    self._compile_lock = threading.Lock()
    self.compilations = 0
    self._compile_time = 0.0
    # Compiling in the background (warmup(background=True)): its executor and
    # the shapes queued on it.
    self._background: concurrent.futures.ThreadPoolExecutor | None = None
    self._queued: set[StepShape] = set()
    self._sub_byte = any(jnp.dtype(x.dtype).itemsize < 1 or jnp.dtype(x.dtype).name in
                         ("int4", "uint4") for x in jax.tree.leaves(self.state))

  @staticmethod
  def _model_key(inputs: ModelInputs) -> tuple:
    return ("model", inputs.src.shape[0], inputs.tokens.shape[0] - inputs.src.shape[0],
            inputs.score_index.shape[0])

  @staticmethod
  def _sampler_key(sampler: SamplerInputs) -> tuple:
    return ("sample", sampler.temperature.shape[0], sampler.banned.shape[1],
            sampler.history_rows.shape[0])

  def _model_args(self, inputs: ModelInputs, placement) -> tuple:
    """Abstract arguments of the model pass: weights and pools placed by
    `placement(array)`, then the previous tokens and the inputs (replicated)."""
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement(x))  # noqa: E731
    return (jax.tree.map(like, self.state), jax.tree.map(like, self.kv),
            self._abstract(np.zeros(self.max_rows, np.int32)), self._abstract(inputs))

  def _sampler_args(self, sampler: SamplerInputs) -> tuple:
    rows = sampler.temperature.shape[0]
    logits = jax.ShapeDtypeStruct((rows, self.model_config.vocab_size), jnp.float32,
                                  sharding=self._replicated)
    return (logits, self._abstract(np.zeros(self.max_rows, np.int32)),
            self._abstract(self.with_masks(sampler)))

  def _abstract(self, tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated), tree)

  def _compile_model(self, inputs: ModelInputs):
    # Weights and pools by their formats (layout + sharding), not just their shapes:
    # sub-byte arrays (int4 weights) can be laid out packed or not, and the compiled
    # step must take them as they lie.
    args = self._model_args(inputs, lambda x: x.format)
    compile_now = lambda: self._model_jit.lower(*args).compile()  # noqa: E731
    if self._sub_byte:
      # An ahead-of-time executable insists on the packed layout of int4 weights,
      # which arrays placed from the host do not have; jit's own dispatch adapts
      # (and compiles on the first call). Compiling ahead is then only worth it
      # to fill a persistent cache that jit reads; without one it would compile
      # every shape twice.
      if jax.config.jax_compilation_cache_dir:
        compile_now()
      return self._store(self._model_key(inputs), self._model_jit, 0.0)
    t0 = time.perf_counter()
    return self._store(self._model_key(inputs), compile_now(), time.perf_counter() - t0)

  def _compile_sampler(self, sampler: SamplerInputs):
    t0 = time.perf_counter()
    compiled = self._sample_jit.lower(*self._sampler_args(sampler)).compile()
    return self._store(self._sampler_key(sampler), compiled, time.perf_counter() - t0)

  def _store(self, key: tuple, compiled, seconds: float):
    """Keeps a compiled executable (the first, if two threads compiled one key)."""
    with self._compile_lock:
      if key not in self._compiled:
        self._compiled[key] = compiled
        self.compilations += 1
        self._compile_time += seconds
    return self._compiled[key]

  def _compile_shape(self, shape: StepShape) -> None:
    """The model pass of a standard step of `shape` and its sampler, unless compiled."""
    if self._standard_key(shape) not in self._compiled:
      self._compile_model(self.standard_inputs(shape))
    sampler = self.standard_sampler(shape)
    if self._sampler_key(sampler) not in self._compiled:
      self._compile_sampler(sampler)

  def export(self, shape: StepShape, platforms: Sequence[str] = ("cuda",),
             sampler: SamplerInputs | None = None
             ) -> tuple[jax.export.Exported, jax.export.Exported]:
    """The model pass and the sampler of a step of `shape` (with `sampler`'s inputs,
    default plain ones) lowered for `platforms` with jax.export, on any host (a CPU
    lowers for CUDA): a shape or dtype that only the GPU path rejects fails here,
    in a CPU test, rather than on a lent GPU. The Pallas kernel's Triton calls are
    allowed (they have no compatibility guarantee across jax versions, which does
    not matter for a check)."""
    shape = StepShape(*shape)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    model = jax.export.export(self._model_jit, platforms=platforms, disabled_checks=checks)(
        *self._model_args(self.standard_inputs(shape), lambda x: x.sharding))
    sampler = sampler if sampler is not None else self.standard_sampler(shape)
    sample = jax.export.export(self._sample_jit, platforms=platforms)(
        *self._sampler_args(sampler))
    return model, sample

  def standard_inputs(self, shape: StepShape) -> ModelInputs:
    """The model pass's inputs of `shape` (no scoring)."""
    return step_inputs.build(self.config, StepShape(*shape), step_inputs.no_decode(self.config),
                             [], self._scratch_slot)

  def standard_sampler(self, shape: StepShape) -> SamplerInputs:
    """Sampler inputs of `shape` as a workload without penalties or bans sends them."""
    return sampler_inputs.inputs_for([], self.sample_rows(StepShape(*shape)),
                               self.model_config.vocab_size)

  def warmup(self, threads: int | None = None, *, background: bool = False) -> float:
    """Compiles the standard step shapes (each shape's model pass and the sampler
    of its rows); returns the seconds it took.

    background=False: every shape now, in parallel threads. background=True:
    only the cover shapes now (the largest decode-only and the largest mixed
    shape, which every step fits in); from then on a step whose own shape is
    not compiled runs padded into the smallest compiled shape that holds it
    (`shape_for`), and the scheduler has its own shape compiled in a background
    thread once the padding has cost more than compiling would
    (`compile_later`). No step waits for a compilation either way; the second
    way starts sooner and compiles only the shapes that pay for themselves.
    """
    t0 = time.perf_counter()
    shapes = self.config.step_shapes()
    if background:
      self._background = concurrent.futures.ThreadPoolExecutor(1, "ridgeline-compile")
      shapes = self.cover_shapes()
    todo = [functools.partial(self._compile_model, self.standard_inputs(s))
            for s in shapes if self._standard_key(s) not in self._compiled]
    samplers = {self._sampler_key(x): x for x in map(self.standard_sampler, shapes)}
    todo += [functools.partial(self._compile_sampler, x) for k, x in samplers.items()
             if k not in self._compiled]
    threads = threads or max(1, min(len(todo), os.cpu_count() or 1))
    if todo:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda compile_: compile_(), todo))
    if background and self.compile_seconds < CACHED_COMPILE_SECONDS:
      # The cover shapes came from the persistent cache, so the others are likely
      # there too: load them all now, in the background (~0.4 s each).
      for shape in self.config.step_shapes():
        self.compile_later(shape)
    return time.perf_counter() - t0

  def cover_shapes(self) -> list[StepShape]:
    """The shapes every step fits in: the largest decode-only one, and the
    largest with prefill (which also holds any decode-only step)."""
    cfg = self.config
    return [StepShape(cfg.decode_buckets[-1], 0),
            StepShape(cfg.mixed_decode_buckets[-1], cfg.prefill_token_buckets[-1])]

  def shape_for(self, shape: StepShape) -> StepShape:
    """The shape a step of `shape` runs as: its own if it is compiled, or unless
    shapes compile in the background; else the smallest compiled standard shape
    that holds it (a decode-only one for a decode-only step, if any)."""
    if self._background is None or self._ready(shape):
      return shape
    fits = [s for s in self._compiled_standard()
            if s.decode >= shape.decode and s.prefill >= shape.prefill]
    if shape.prefill == 0:  # a decode-only shape holds it without a padded prefill region
      fits = [s for s in fits if s.prefill == 0] or fits
    if not fits:
      return shape  # nothing compiled holds it: dispatch compiles it now
    return min(fits, key=lambda s: (s.prefill, s.decode))

  def compile_later(self, shape: StepShape) -> None:
    """Queues `shape` to compile in the background thread (once)."""
    with self._compile_lock:
      if self._background is None or shape in self._queued or self._ready(shape):
        return
      self._queued.add(shape)
    self._background.submit(self._compile_shape, shape)

  @property
  def compile_seconds(self) -> float:
    """The mean wall seconds a variant took to compile so far (2 before any)."""
    return self._compile_time / self.compilations if self.compilations else 2.0

  def _ready(self, shape: StepShape) -> bool:
    """Whether a standard step of `shape` runs without compiling."""
    return all(k in self._compiled for k in self.standard_keys(shape))

  def standard_keys(self, shape: StepShape) -> tuple[tuple, tuple]:
    """The keys of a standard step's model pass and sampler."""
    return (self._standard_key(shape),
            ("sample", self.sample_rows(shape), sampler_inputs.BAN_WIDTH,
             sampler_inputs.HISTORY_TOKENS))

  def _standard_key(self, shape: StepShape) -> tuple:
    return ("model", shape.decode, shape.prefill, 0)

  def _compiled_standard(self) -> list[StepShape]:
    return [StepShape(k[1], k[2]) for k in list(self._compiled)
            if k[0] == "model" and k[3] == 0 and self._ready(StepShape(k[1], k[2]))]

  @property
  def variants(self) -> set[tuple]:
    """Keys of the executables compiled so far (model passes and samplers)."""
    return set(self._compiled)

  def hlo_text(self, shape: StepShape) -> str:
    """The compiled model pass of `shape` (where the page pools are donated)."""
    shape = StepShape(*shape)
    compiled = self._compiled.get(self._standard_key(shape)) or self._compile_model(
        self.standard_inputs(shape))
    return compiled.as_text()
