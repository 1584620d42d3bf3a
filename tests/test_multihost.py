"""Two processes (4 fake CPU devices each, coordinator on localhost) run the same
program over one global 8-device mesh and generate what one 8-device process does."""

import json
import os
import pathlib
import re
import subprocess
import sys

import portpicker

from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.engine import loading
from ridgeline.model import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH = "data=2,model=4"
ENGINE = dict(page_size=8, num_pages=24, max_model_len=64, max_batch=4, prefill_chunk=16,
              max_prefill_batch=2)
PROMPTS = [[5, 17, 200, 3, 42], [300, 1, 2, 9, 88, 123, 7, 450, 61, 77, 19], [42]]
MAX_TOKENS = 6


def _command(prompts_file, port, process_id):
  """The README's two-process command, for preset `tiny`."""
  flags = [f"--{k}={v}" for k, v in ENGINE.items()]
  return [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model=tiny",
          f"--input={prompts_file}", f"--max_tokens={MAX_TOKENS}", "--show_token_ids",
          f"--mesh={MESH}", *flags, f"--coordinator_address=localhost:{port}",
          "--num_processes=2", f"--process_id={process_id}"]


def test_two_processes_match_one_process_with_8_devices(tmp_path):
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(_command(prompts_file, port, i), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]

  # Meanwhile, the same model and engine in this process, over 8 local devices.
  mesh = sharding.make_mesh(MESH)
  model, _ = loading.load_model(preset="tiny", mesh=mesh)
  engine = Engine(model, None, EngineConfig(**ENGINE), mesh=mesh)
  want = [o.token_ids for o in engine.generate(
      PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))]

  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=240)
      assert proc.returncode == 0, f"process failed:\n{err[-4000:]}"
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for out in outputs:
    got = [json.loads(ids) for ids in re.findall(r"^token_ids: (\[.*\])$", out, re.M)]
    assert got == want
  assert all(len(ids) == MAX_TOKENS for ids in want)
