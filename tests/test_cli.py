"""The commands from outside: their --help, one-line errors,
generate.py's inputs, convert_checkpoint.py's messages, the compilation cache on by
default, and the console scripts of an installed package."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE_SCRIPTS = {  # script -> one of its own flags
    "generate": "--prompt", "batch_generate": "--metrics_port", "benchmark": "--mode",
    "conversation_demo": "--turns"}
SHARED = ("--checkpoint", "--num_pages", "--max_model_len", "--compilation_cache_dir",
          "--cache_dir", "--[no]verbose")
TINY = ["--model", "tiny", "--page_size", "16", "--num_pages", "16", "--max_model_len", "64",
        "--max_batch", "4", "--prefill_chunk", "32", "--max_prefill_batch", "2"]


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _start(script, *args, cwd=ROOT):
  return subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args],
                          cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run(script, *args, timeout=300):
  proc = _start(script, *args)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


# --help ----------------------------------------------------------------------------


def test_help_lists_own_and_shared_flags_and_exits_0():
  procs = {s: _start(s, "--help") for s in [*ENGINE_SCRIPTS, "convert_checkpoint"]}
  for script, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (script, err)
    assert "Flags of this command:" in out and "Common flags:" in out
    assert "--[no]verbose" in out
    if script == "convert_checkpoint":
      assert "--[no]force" in out and "--input" in out and "--num_pages" not in out
    else:
      own = out[out.index("Flags of this command:"):out.index("Model and engine flags")]
      assert ENGINE_SCRIPTS[script] in own, script
      for flag in SHARED:
        assert flag in out, (script, flag)


def test_make_sharegpt_lengths_help_writes_nothing():
  target = ROOT / "benchmarks" / "sharegpt_lengths.json"
  before = (target.read_bytes(), target.stat().st_mtime_ns)
  code, out, err = _run("make_sharegpt_lengths", "--help")
  assert code == 0 and "--check" in out and "usage: make_sharegpt_lengths.py" in out
  assert (target.read_bytes(), target.stat().st_mtime_ns) == before
  code, out, err = _run("make_sharegpt_lengths", "--bogus")
  assert code == 2 and "unrecognized arguments: --bogus" in err
  assert (target.read_bytes(), target.stat().st_mtime_ns) == before


# One-line errors -------------------------------------------------------------------


def test_errors_are_one_line_and_verbose_keeps_the_traceback(tmp_path):
  plain = tmp_path / "prompts.txt"
  plain.write_text("What is the capital of France?\nAnd of Spain?\n")
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"prompt": [1, 2]}\n[1, 2, 3]\n')
  cases = {
      "no prompt": (["--model", "tiny"], 2,
                    "error: no prompt: give --prompt TEXT, --chat MESSAGE or --input "
                    "FILE.jsonl (see --help)"),
      "plain text": (["--model", "tiny", "--input", str(plain)], 1,
                     f"error: {plain} line 1: not JSON (Expecting value: line 1 column 1 "
                     "(char 0)); each line must be a JSON object such as {\"prompt\": "
                     "\"text\"}"),
      "not an object": (["--model", "tiny", "--input", str(rows)], 1,
                        f"error: {rows} line 2: expected a JSON object, got list; each "
                        "line must be a JSON object"),
      "bad flag": (["--model", "tiny", "--max_tokens", "many"], 2,
                   "error: flag --max_tokens=many: invalid literal for int()"),
      "bad checkpoint": (["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], 1,
                         f"error: {tmp_path / 'nope'} does not exist"),
  }
  procs = {k: _start("generate", *args) for k, (args, _, _) in cases.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    _, code, start = cases[name]
    lines = err.strip().splitlines()
    assert proc.returncode == code, (name, err)
    assert len(lines) == 1 and lines[0].startswith(start), (name, err)
  code, _, err = _run("generate", "--model", "tiny", "--input", str(rows), "--verbose")
  assert code == 1 and "Traceback (most recent call last)" in err
  assert "expected a JSON object, got list" in err


# generate.py --input --------------------------------------------------------------


def test_generate_input_honours_per_line_sampling_and_caches_compilations(tmp_path):
  inp = tmp_path / "in.jsonl"
  inp.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": [1, 2, 3], "sampling": {"max_tokens": 3}},
      {"prompt": [4, 5], "sampling": {"max_tokens": 5, "ignore_eos": True}},
      {"custom_id": "x", "body": {"prompt": [6, 7], "max_tokens": 2}},
  ]) + "\n")
  cache = tmp_path / "cache"
  code, out, err = _run("generate", *TINY, "--input", str(inp), "--max_tokens", "7",
                        "--prompt", "", "--cache_dir", str(cache))
  # --prompt "" fails alone (no tokenizer for the tiny preset) and the rest run.
  assert code == 0, err
  assert "[error] a text prompt needs a tokenizer" in out
  counts = [line.split(" tokens")[0] for line in out.splitlines()
            if line.startswith("[") and " tokens, " in line]
  assert counts == ["[0", "[3", "[5", "[2"]
  # The persistent compilation cache is on by default, under --cache_dir.
  entries = os.listdir(cache / "jax_cache")
  assert entries, "no compiled steps were persisted"


# convert_checkpoint.py ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
  """A tiny random Llama in Hugging Face format, with the default model's tokenizer."""
  import torch
  import transformers
  from ridgeline.model import default_model
  from ridgeline.model.tokenizer import load_tokenizer
  path = tmp_path_factory.mktemp("hf") / "tiny-llama"
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=256)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  load_tokenizer(default_model.gguf_path()).save(path)
  return path


def test_convert_messages_use_the_flag_and_are_quiet(tiny_hf_dir, tmp_path):
  out = tmp_path / "ckpt"
  args = ["--input", str(tiny_hf_dir), "--output", str(out)]
  code, stdout, err = _run("convert_checkpoint", *args)
  assert code == 0, err
  assert stdout.strip() == f"wrote {out}"
  assert not [line for line in err.splitlines() if line.startswith("I") or "INFO" in line], err
  code, _, err = _run("convert_checkpoint", *args)
  lines = err.strip().splitlines()
  assert code == 1 and len(lines) == 1, err
  assert lines[0].startswith(f"error: checkpoint {out} already exists")
  assert "pass --force to replace it" in lines[0] and "force=True" not in lines[0]
  code, stdout, err = _run("convert_checkpoint", *args, "--force")
  assert code == 0 and stdout.strip() == f"wrote {out}", err


def test_from_checkpoint_enables_the_compilation_cache(tiny_hf_dir, tmp_path):
  import jax
  from ridgeline.engine.engine import Engine, EngineConfig
  previous = jax.config.jax_compilation_cache_dir
  try:
    engine = Engine.from_checkpoint(str(tiny_hf_dir), EngineConfig(
        page_size=16, num_pages=8, max_model_len=64, max_batch=2, prefill_chunk=32),
        compilation_cache_dir=str(tmp_path / "jc"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jc")
    assert engine.tokenizer is not None
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)


# pip install . ---------------------------------------------------------------------


def test_pip_install_provides_console_scripts(tmp_path):
  target = tmp_path / "site"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
       "--no-compile", "--target", str(target), str(ROOT)],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  for name in ("ridgeline-generate", "ridgeline-batch", "ridgeline-convert", "ridgeline-bench",
               "ridgeline-serve"):
    assert (target / "bin" / name).exists(), name
  # One namespace: nothing generic (engine, model, configs) at the top of site-packages.
  top = {p.name for p in target.iterdir()}
  assert top == {"bin", "ridgeline", "ridgeline-0.1.0.dist-info"}, top
  assert not (target / "ridgeline" / "__init__.py").exists()  # an implicit namespace
  assert {p.name for p in (target / "ridgeline").iterdir()} == {
      "util", "model", "configs", "engine", "frontends", "tools", "cli"}
  env = _env()
  env["PYTHONPATH"] = str(target)  # ahead of the shared venv's editable install
  where = subprocess.run([sys.executable, "-c", "import ridgeline.cli, ridgeline.engine; "
                          "print(ridgeline.cli.__file__, ridgeline.engine.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert where.stdout.split() == [str(target / "ridgeline" / "cli" / "__init__.py"),
                                  str(target / "ridgeline" / "engine" / "__init__.py")], where
  help_ = subprocess.run([str(target / "bin" / "ridgeline-generate"), "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
  assert help_.returncode == 0, help_.stderr
  assert help_.stdout.startswith("Generates text for a few prompts")
  assert "--prompt" in help_.stdout and "--num_pages" in help_.stdout
