#!/usr/bin/env bash
# The GPU benchmark: Llama-3.1-8B with random bf16 weights on one H100 or H200, in
# under 5 minutes. It checks the Pallas paged-attention kernel against the XLA
# reference on the GPU, then measures batch-1 and batch-8 decode MBU, throughput at
# 128 in / 128 out over 1,024 requests, prefill MFU at 2,048 tokens, and the time
# to first token cold and warm (JAX's persistent compilation cache), and prints a
# table against the targets.
#
#   scripts/gpu_bench.sh                       # on the GPU machine
#   MODEL=tiny scripts/gpu_bench.sh            # anywhere, on a small config: the
#                                              # script itself works (CPU included)
#
# Environment: PYTHON (default python3, else .venv/bin/python), OUT (results
# folder, default /tmp/gpu_bench), MODEL (a preset; default llama-3.1-8b).
# Packages missing on the machine (gguf) may be carried as wheels in .whl/; flax
# from .whl/ is used only when the installed one lacks what the model needs.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_bench}
MODEL=${MODEL:-llama-3.1-8b}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if command -v python3 >/dev/null && python3 -c "import jax" 2>/dev/null; then PYTHON=python3
  else PYTHON=.venv/bin/python; fi
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Let the engine take GPU memory through its own budget (--memory_fraction below),
# leaving room for the prefill step's temporaries.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/ridgeline_site
  for whl in .whl/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    if [ "$name" = flax ]; then
      # The machine's flax goes with its jax; ours only if that one is too old.
      $PYTHON -c "from flax import nnx; nnx.List; nnx.Param.set_value" 2>/dev/null && continue
    else
      $PYTHON -c "import $name" 2>/dev/null && continue
    fi
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SITE" "$whl" && echo "installed $(basename "$whl")"
  done
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi

$PYTHON - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import jax, flax, sys
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__,
      "|", jax.devices())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$OUT/versions.txt"

if [ "$MODEL" = tiny ]; then
  # Small enough for a CPU: the same steps, tiny sizes.
  COMMON=(--model tiny --max_model_len 512 --max_batch 16 --page_size 16 --kv_cache_mb 64)
  DECODE=(--batch_sizes 1,8 --contexts 128 --steps 5 --engine_tokens_limit 0)
  PREFILL=(--prefill_tokens 256 --prefill_chunk 2048 --max_prefill_batch 16)
  PREFILL_BATCH=(--prefill_batch_shapes 16x32)
  THROUGHPUT=(--workloads 32:16 --num_requests 48 --warmup_requests 48 --repeats 1)
  TTFT=(--ttft_prompt_len 32)
else
  COMMON=(--model "$MODEL" --max_model_len 4096 --max_batch 512 --page_size 16
          --memory_fraction 0.7)
  DECODE=(--batch_sizes 1,8 --contexts 1024 --steps 20 --engine_tokens_limit 0)
  PREFILL=(--prefill_tokens 2048 --prefill_chunk 65536 --max_prefill_batch 512)
  PREFILL_BATCH=(--prefill_batch_shapes 512x128)  # the throughput run's prefill step
  # The warm-up is the whole workload: a shorter one left the steps at the boundary
  # between waves of 512 uncompiled, and they compiled inside the timed run.
  THROUGHPUT=(--workloads 128:128 --num_requests 1024 --warmup_requests 1024 --repeats 1)
  TTFT=(--ttft_prompt_len 128)
fi
CACHE="$OUT/jax_cache"
rm -rf "$CACHE"
BENCH=($PYTHON scripts/benchmark.py "${COMMON[@]}" --compilation_cache_dir "$CACHE")

stage() {  # stage NAME LIMIT_S ARGS...: one benchmark process, its log under $OUT
  local name=$1 limit=$2; shift 2
  echo "== $name ($(( $(date +%s) - START )) s in)"
  timeout "$limit" "${BENCH[@]}" "$@" --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e '^W0' -e '^I0' -e 'Warning' "$OUT/$name.log" | tail -n 25
  [ $rc -eq 0 ] || echo "!! $name exited with $rc"
}

# 1. Cold: an empty compilation cache, a fresh process, one request.
stage ttft_cold 60 --mode ttft "${TTFT[@]}" "${PREFILL[@]}"
# 2. The kernel check, decode, prefill and throughput, in one process.
stage main 200 --mode kernels,decode,prefill,throughput "${DECODE[@]}" "${PREFILL[@]}" \
  "${PREFILL_BATCH[@]}" "${THROUGHPUT[@]}" --profile
# 3. Warm: the same first request in a fresh process, the cache now filled.
stage ttft_warm 40 --mode ttft "${TTFT[@]}" "${PREFILL[@]}"

$PYTHON - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
  try:
    return json.load(open(os.path.join(out, name + ".json")))
  except (OSError, ValueError):
    return {}
main, cold, warm = load("main"), load("ttft_cold"), load("ttft_warm")
rows = []
def row(what, value, target="", met=None):
  rows.append((what, value, target, "" if met is None else ("MET" if met else "NOT MET")))
m = main.get("machine", {})
print(f"\n{m.get('device_kind', '?')}, jax {m.get('jax', '?')}, model {main.get('model', {}).get('name', '?')} "
      f"({main.get('model', {}).get('compute_dtype', '?')}), attention {main.get('attention_impl')} "
      f"-> {main.get('attention_resolved')}")
meas = main.get("measured", {})
copy = meas.get("copy_bandwidth")
if copy:
  row("measured copy bandwidth", f"{copy / 1e9:.0f} GB/s")
  row("measured matmul", f"{meas['matmul_flops'] / 1e12:.0f} TFLOP/s")
kern = main.get("kernels", {})
for k in kern.get("points", []):
  err = k.get("relative_error")
  row(f"Pallas vs XLA attention, B={k['batch']} ctx={k['context']}",
      f"rel err {err:.1e}, {1e6 * k.get(kern['impl'] + '_seconds', 0):.0f} vs {1e6 * k.get('xla_seconds', 0):.0f} us"
      if err is not None else k.get("error", "?")[:60], "< 1e-2", err is not None and err < 1e-2)
for p in main.get("decode", []):
  d = p.get("pipelined", p)  # steps back to back: the device's time per step
  bw = d["bytes_per_second"]
  of_copy = bw / copy if copy else None
  row(f"decode B={p['batch']} ctx={p['context']}",
      f"{1e3 * d['step_seconds']:.2f} ms piped ({1e3 * p['step_seconds']:.2f} ms synced), "
      f"{d['tokens_per_second']:.0f} tok/s, {bw / 1e9:.0f} GB/s, MBU {100 * d['mbu']:.0f}% of table"
      + (f", {100 * of_copy:.0f}% of copy" if copy else ""),
      ">= 80% of copy" if p["batch"] == 1 else "", (of_copy >= 0.8) if (p["batch"] == 1 and copy) else None)
pf = main.get("prefill")
if pf:
  row(f"prefill {pf['tokens']} tokens", f"{1e3 * pf['median']:.1f} ms, "
      f"{pf['flops_per_second'] / 1e12:.0f} TFLOP/s, MFU {100 * pf['mfu']:.0f}%", ">= 50%", pf["mfu"] >= 0.5)
for pb in main.get("prefill_batches", []):
  row(f"prefill step {pb['shape']}", f"{1e3 * pb['median']:.1f} ms, {pb['tokens_per_second']:.0f} tok/s, "
      f"MFU {100 * pb['mfu']:.0f}%")
for t in main.get("throughput", []):
  row(f"throughput {t['workload']} x {t['requests']}", f"{t['output_tokens_per_second']:.0f} out tok/s, "
      f"{t['requests_per_second']:.1f} req/s, {t['seconds']['median']:.1f} s ("
      + ", ".join(f"{k} {v['steps']} steps {v['seconds']:.1f} s" for k, v in t.get("model_steps", {}).items())
      + ")",
      ">= 15000" if t["workload"] == "128:128" else "", t["output_tokens_per_second"] >= 15000
      if t["workload"] == "128:128" and t["requests"] >= 1024 else None)
for name, r in (("cold", cold), ("warm", warm)):
  t = r.get("ttft")
  if t:
    row(f"TTFT {name} ({t['prompt_len']}-token prompt)", f"{1e3 * t['first_request']:.0f} ms "
        f"(then {1e3 * t['second_request']:.0f} ms in-process)")
w = max(len(r[0]) for r in rows) if rows else 0
for what, value, target, met in rows:
  print(f"{what:<{w}}  {value}  {target}  {met}")
EOF
echo "total $(( $(date +%s) - START )) s; results in $OUT"
