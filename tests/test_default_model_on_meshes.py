"""The real default model on all 8 fake CPU devices: restored from its orbax
checkpoint and converted from its GGUF onto meshes data=1,model=8 and data=2,model=4,
it generates transformers' greedy tokens.

Loading the checkpoint onto these meshes once deadlocked XLA:CPU (the per-tensor
digests were hundreds of multi-device all-reduce programs in flight; see
model/checkpoint.py), which tiny random models never showed. A deadlock does not
raise: XLA:CPU aborts the process after ~60 s, and a backend without such a timeout
would wait forever.
So each load runs in a child process under a time limit, and a child that dies or
overruns fails the test with its mesh, source and the tail of its stderr.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = ["data=1,model=8", "data=2,model=4"]
NEW_TOKENS = 16
ENGINE = dict(page_size=16, num_pages=32, max_model_len=128, max_batch=4, prefill_chunk=64,
              max_prefill_batch=4)
# One child (start-up, load, compile, 16 greedy tokens for 3 prompts) took 38-79 s
# wall on the shared 2-core machine at load average 13; the four together ~2 min of
# CPU. A deadlocked child aborts after ~60 s of waiting in XLA's rendezvous (CPU), or
# runs into this limit (GPU).
CHILD_TIMEOUT_S = 420


def _child(source: str, mesh_text: str, prompts: list[list[int]], compile_cache: str,
           peaks: dict) -> dict:
  """In the child: load `source` onto `mesh_text`, generate greedily, report."""
  from ridgeline.engine import roofline
  from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
  from ridgeline.engine.runner import enable_compilation_cache
  from ridgeline.engine import loading
  from ridgeline.model import params as params_lib
  from ridgeline.model import sharding
  from ridgeline.model import transformer as transformer_lib

  # The children on one mesh compile the same programs: sharing them through JAX's
  # persistent cache took a child from 57 s to 26 s (measured on the 2-core machine).
  enable_compilation_cache(compile_cache)
  mesh = sharding.make_mesh(mesh_text)
  t0 = time.perf_counter()
  model, tokenizer = loading.load_model(source, mesh=mesh)
  flat = params_lib.flatten(transformer_lib.to_params(model))
  for a in flat.values():
    a.block_until_ready()
  load_s = time.perf_counter() - t0
  devices = set(mesh.devices.flat)
  per_device = {d.id: sum(s.data.nbytes for a in flat.values() for s in a.addressable_shards
                          if s.device == d) for d in devices}
  report = sharding.memory_report(model.config, mesh)
  engine = Engine(model, tokenizer, EngineConfig(**ENGINE), mesh=mesh,
                  peaks=roofline.DevicePeaks(**peaks))  # its EOS ends answers
  outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
  return {
      "tokens": [o.token_ids for o in outs],
      "errors": [o.error for o in outs],
      "off_mesh": sorted(n for n, a in flat.items() if set(a.sharding.device_set) != devices),
      "bytes_per_device": sorted(set(per_device.values())),
      "expected_bytes_per_device": report.weight_bytes_per_device,
      "load_s": load_s, "total_s": time.perf_counter() - t0,
  }


def _run_child(source: str, mesh_text: str, prompts: list[list[int]], tmp_path,
               compile_cache) -> dict:
  from ridgeline.engine import roofline
  # The parent's measured CPU peaks (memoized per process), so the children do not
  # each calibrate, and plan -- and compile -- the same steps.
  peaks = dataclasses.asdict(roofline.device_peaks())
  args = tmp_path / "args.json"
  args.write_text(json.dumps({"source": source, "mesh": mesh_text, "prompts": prompts,
                              "compile_cache": str(compile_cache), "peaks": peaks}))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  what = f"loading {source} onto mesh {mesh_text} and generating"
  try:
    proc = subprocess.run([sys.executable, __file__, str(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
    pytest.fail(f"{what} did not finish within {CHILD_TIMEOUT_S} s (a collective that "
                f"not every device reaches hangs like this); stderr tail:\n{err[-3000:]}")
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    rendezvous = "rendezvous" in proc.stderr
    pytest.fail(f"{what} failed with exit status {proc.returncode}"
                + (" in an XLA collective rendezvous (deadlock)" if rendezvous else "")
                + f"; stderr tail:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def parity(hf_smollm2):
  """Prompt token ids and transformers' greedy continuations of them."""
  from test_default_model import CHATS, PLAIN, _hf_greedy  # the parity prompts
  hf_model, hf_tok = hf_smollm2
  prompts = [PLAIN[0], PLAIN[1], CHATS[0]]
  ids = [hf_tok(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else
         list(hf_tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)) for p in prompts]
  return ids, [_hf_greedy(hf_model, i, NEW_TOKENS) for i in ids]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("source", ["checkpoint", "gguf"])
def test_real_model_on_8_devices_matches_transformers(source, mesh, parity, tmp_path,
                                                      compile_cache, default_checkpoint,
                                                      smollm2_gguf):
  ids, want = parity
  path = default_checkpoint if source == "checkpoint" else smollm2_gguf
  got = _run_child(path, mesh, ids, tmp_path, compile_cache)
  print(f"{source} on {mesh}: loaded in {got['load_s']:.1f} s, "
        f"{got['total_s']:.1f} s with generation")
  assert got["errors"] == [None] * len(ids)
  assert got["off_mesh"] == [], "weights not placed on the whole mesh"
  # Every device holds exactly its planned share (so the weights really are sharded).
  assert got["bytes_per_device"] == [got["expected_bytes_per_device"]]
  for prompt, tokens, ref in zip(ids, got["tokens"], want):
    assert tokens == ref, f"{source} on {mesh}, prompt {prompt}"


if __name__ == "__main__":  # the child process
  spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
  result = _child(spec["source"], spec["mesh"], spec["prompts"], spec["compile_cache"],
                  spec["peaks"])
  print("RESULT " + json.dumps(result), flush=True)
