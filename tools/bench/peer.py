"""The peer: Hugging Face transformers' `generate` on the same weights, for
side-by-side numbers.

It runs in a worker process: in one process, XLA's and torch's CPU thread pools
(each as wide as the machine) compete, and the measured slowdown was 40x for
transformers at batch 1. The two engines take turns, one idle while the other is
timed.
"""

from __future__ import annotations

import os
import pathlib


def checkpoint_for_peer(path: str | None) -> str:
  """The weights both engines can load: `path` (a .gguf file or a Hugging Face
  directory), or the default model's GGUF when None."""
  if path is None:
    from ridgeline.model import default_model
    return str(default_model.gguf_path())
  p = pathlib.Path(path)
  if p.suffix != ".gguf" and not (p / "config.json").exists():
    raise ValueError(f"{path}: the transformers peer needs the default model, a .gguf file or "
                     "a Hugging Face directory (the same weights for both engines); an orbax "
                     "checkpoint or a preset has none it can read")
  return str(p)


class HFPeer:
  """transformers' generate in a worker process (see the module docstring)."""

  name = "transformers"

  def __init__(self, path: str, threads: int, repeats: int = 3):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_worker, args=(child, path, threads), daemon=True)
    self._proc.start()
    ok, info = self._conn.recv()
    if not ok:
      raise RuntimeError(f"transformers worker failed: {info}")
    self.threads = threads
    self.repeats = repeats

  def close(self) -> None:
    """Ends the worker (it returns when its end of the pipe closes)."""
    self._conn.close()
    self._proc.join(timeout=30)
    if self._proc.is_alive():
      self._proc.kill()

  def _call(self, name, *args):
    self._conn.send((name, args))
    ok, value = self._conn.recv()
    if not ok:
      raise RuntimeError(f"transformers worker: {value}")
    return value

  def generate_seconds(self, prompts: list[list[int]], new: int) -> list[float]:
    """Seconds of one generate call of `new` tokens over equal-length prompts."""
    return self._call("generate_seconds", prompts, new, self.repeats)

  def decode_per_token(self, prompts: list[list[int]], new: int, repeats: int | None = None,
                       warm: bool = True) -> list[float]:
    """Per-token decode seconds: (t[new + 1 tokens] - t[1 token]) / new."""
    return self._call("decode_per_token", prompts, new,
                      self.repeats if repeats is None else repeats, warm)

  def throughput_seconds(self, prompts: list[list[int]], new: int, batch: int) -> list[float]:
    """Static batches of `batch` equal-length prompts, each generating `new` tokens."""
    return self._call("throughput_seconds", prompts, new, batch, self.repeats)


def _worker(conn, path: str, threads: int) -> None:
  """The transformers side (a separate process; see HFPeer)."""
  try:
    # Idle OpenMP threads sleep instead of spinning on cores the other engine uses.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from ridgeline.tools.bench.common import host
    from ridgeline.engine.roofline import time_calls
    torch.set_num_threads(threads)
    p = pathlib.Path(path)
    if p.suffix == ".gguf":
      model = transformers.AutoModelForCausalLM.from_pretrained(
          str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
      model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.eval()
  except Exception as e:  # reported to the parent
    conn.send((False, f"{type(e).__name__}: {e}"))
    return
  conn.send((True, None))

  def generate(ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n
    return out

  once = lambda *args: time_calls(generate, *args, repeats=1, warmup=0, sync=host)[0]

  def generate_seconds(prompts, new, repeats):
    return time_calls(generate, torch.tensor(prompts), new, repeats=repeats, sync=host)

  def decode_per_token(prompts, new, repeats, warm):
    ids = torch.tensor(prompts)
    if warm:
      generate(ids, new + 1)
    return [(once(ids, new + 1) - once(ids, 1)) / new for _ in range(repeats)]

  def throughput_seconds(prompts, new, batch, repeats):
    chunks = [torch.tensor(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    generate(chunks[0], 2)  # warm-up
    return time_calls(lambda: [generate(ids, new) for ids in chunks], repeats=repeats,
                      warmup=0, sync=host)

  calls = {f.__name__: f for f in (generate_seconds, decode_per_token, throughput_seconds)}
  with torch.inference_mode():
    while True:
      try:
        name, args = conn.recv()
      except EOFError:
        return
      try:
        conn.send((True, calls[name](*args)))
      except Exception as e:
        conn.send((False, f"{type(e).__name__}: {e}"))
