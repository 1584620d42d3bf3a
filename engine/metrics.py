"""What the engine reports: load first (batch size, KV-cache use), then the cache
economy (prefix hits, evictions, preemptions), the roofline (target and achieved
arithmetic intensity, MFU, MBU) and per-request latency (TTFT, TPOT, queue time).

Each engine owns one `Metrics` with its own prometheus_client registry (no
process-global state): `prometheus_text()` is the exposition format a scraper
reads, `snapshot()` a JSON-ready summary with percentiles for the end of a batch
job. Raw samples for percentiles are kept in memory, 8 bytes each and at most
`MAX_SAMPLES` of each kind (the oldest half is dropped when full), so a server
that runs for weeks stays bounded; percentiles then cover the recent samples.
"""

from __future__ import annotations

import array

import prometheus_client as prom

from ridgeline.util import percentiles

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_SAMPLES = 1 << 20  # of each kind: 8 MiB


class _Samples:
  """Float samples numbered from 0, the latest `cap` of them kept."""

  def __init__(self, cap: int = MAX_SAMPLES):
    self.cap, self.dropped, self.values = cap, 0, array.array("d")

  def append(self, value: float) -> None:
    if len(self.values) >= self.cap:
      half = self.cap // 2
      del self.values[:half]
      self.dropped += half
    self.values.append(value)

  def count(self) -> int:
    """Samples ever appended (the next one's number)."""
    return self.dropped + len(self.values)

  def since(self, index: int = 0) -> list[float]:
    """The kept samples numbered `index` and later."""
    return self.values[max(0, index - self.dropped):].tolist()


class Metrics:
  """Counters, gauges and histograms of one engine."""

  def __init__(self, ridge_point: float):
    self.ridge_point = ridge_point
    r = self.registry = prom.CollectorRegistry()
    p = "ridgeline_"
    self.decode_batch = prom.Histogram(p + "decode_batch_size", "Decode rows per step",
                                       buckets=_BATCH_BUCKETS, registry=r)
    self.kv_util = prom.Gauge(p + "kv_cache_utilization",
                              "Fraction of KV pages owned by sequences", registry=r)
    self.running = prom.Gauge(p + "requests_running", "Sequences holding KV pages", registry=r)
    self.waiting = prom.Gauge(p + "requests_waiting", "Sequences waiting to run", registry=r)
    self.prefix_queries = prom.Counter(p + "prefix_cache_queries_tokens",
                                       "Prompt tokens looked up in the prefix cache", registry=r)
    self.prefix_hits = prom.Counter(p + "prefix_cache_hits_tokens",
                                    "Prompt tokens found in the prefix cache", registry=r)
    self.evictions = prom.Counter(p + "prefix_cache_evictions",
                                  "Cached pages evicted to make room", registry=r)
    # The host tier (engine/kv_host.py).
    self.host_hits = prom.Counter(p + "kv_host_hit_tokens",
                                  "Prompt tokens found in the host KV tier (past the device's "
                                  "prefix hit)", registry=r)
    self.host_loaded = prom.Counter(p + "kv_host_loaded_tokens", "Host-tier hit tokens copied "
                                    "back to the device (recomputation avoided)", registry=r)
    self.host_declined = prom.Counter(p + "kv_host_recomputed_tokens", "Host-tier hit tokens "
                                      "recomputed instead (priced cheaper, or no room)",
                                      registry=r)
    self.host_bytes = prom.Counter(p + "kv_host_bytes", "KV bytes moved between the tiers",
                                   ["direction"], registry=r)
    self.host_evictions = prom.Counter(p + "kv_host_evictions",
                                       "Pages dropped from the full host tier", registry=r)
    self.host_pages = prom.Gauge(p + "kv_host_pages", "Pages held by the host tier",
                                 registry=r)
    self.preemptions = prom.Counter(p + "preemptions", "Sequences preempted (recomputed later)",
                                    registry=r)
    self.prompt_tokens = prom.Counter(p + "prompt_tokens", "Prompt tokens of admitted requests",
                                      registry=r)
    self.generated_tokens = prom.Counter(p + "generation_tokens", "Tokens generated", registry=r)
    self.computed_tokens = prom.Counter(p + "computed_tokens",
                                        "Tokens run through the model (decode rows, prompt)",
                                        ["kind"], registry=r)
    self.steps = prom.Counter(p + "steps", "Model steps", ["kind"], registry=r)
    self.memory_bound_steps = prom.Counter(p + "memory_bound_steps",
                                           "Steps whose intensity was below the ridge point",
                                           ["kind"], registry=r)
    self.target_intensity = prom.Gauge(p + "target_arithmetic_intensity",
                                       "The ridge point the planner aims for (FLOP/byte)",
                                       registry=r)
    self.achieved_intensity = prom.Gauge(p + "achieved_arithmetic_intensity",
                                         "FLOPs per byte of the last step", ["kind"], registry=r)
    self.mfu = prom.Gauge(p + "mfu", "Model FLOPs utilization of the last step", ["kind"],
                          registry=r)
    self.mbu = prom.Gauge(p + "mbu", "Memory bandwidth utilization of the last step", ["kind"],
                          registry=r)
    self.host_seconds = prom.Counter(p + "host_seconds", "Seconds the host spent in engine "
                                     "steps, waiting for the device excluded", registry=r)
    self.device_wait_seconds = prom.Counter(p + "device_wait_seconds", "Seconds engine steps "
                                            "waited for the device's tokens", registry=r)
    self.ttft = prom.Histogram(p + "time_to_first_token_seconds", "Arrival to first token",
                               buckets=_LATENCY_BUCKETS, registry=r)
    self.tpot = prom.Histogram(p + "time_per_output_token_seconds",
                               "Mean time per output token after the first",
                               buckets=_LATENCY_BUCKETS, registry=r)
    self.queue_time = prom.Histogram(p + "queue_time_seconds", "Arrival to first scheduled",
                                     buckets=_LATENCY_BUCKETS, registry=r)
    self.target_intensity.set(ridge_point)
    self._samples: dict[str, _Samples] = {k: _Samples() for k in (
        "decode_batch_size", "ttft", "tpot", "queue_time", "kv_cache_utilization")}
    self._steps: dict[str, dict[str, float]] = {}
    self._host = {"steps": 0, "seconds": 0.0, "wait_seconds": 0.0}

  # Hooks the scheduler calls -------------------------------------------------

  def on_step(self, kind: str, batch: int, tokens: int, flops: float, bytes_: float,
              seconds: float, mfu: float, mbu: float) -> None:
    """One step: `kind` is "decode", "prefill" or "mixed" (both in one pass);
    `batch` its decode rows, `tokens` all the tokens it computed."""
    intensity = flops / bytes_ if bytes_ else 0.0
    self.steps.labels(kind).inc()
    self.computed_tokens.labels("decode").inc(batch)
    self.computed_tokens.labels("prefill").inc(tokens - batch)
    self.achieved_intensity.labels(kind).set(intensity)
    self.mfu.labels(kind).set(mfu)
    self.mbu.labels(kind).set(mbu)
    if intensity < self.ridge_point:
      self.memory_bound_steps.labels(kind).inc()
    if batch:  # decode rows (a mixed step has both)
      self.decode_batch.observe(batch)
      self._samples["decode_batch_size"].append(batch)
    acc = self._steps.setdefault(kind, dict(steps=0, memory_bound=0, tokens=0, flops=0.0,
                                            bytes=0.0, seconds=0.0, mfu_x_s=0.0, mbu_x_s=0.0))
    acc["steps"] += 1
    acc["memory_bound"] += intensity < self.ridge_point
    acc["tokens"] += tokens
    acc["flops"] += flops
    acc["bytes"] += bytes_
    acc["seconds"] += seconds
    acc["mfu_x_s"] += mfu * seconds
    acc["mbu_x_s"] += mbu * seconds

  def on_host_step(self, seconds: float, wait_seconds: float) -> None:
    """One engine step took `seconds` on the host, of which `wait_seconds` waiting
    for the device (the rest is the host's own work: planning, building inputs,
    dispatching, reading tokens, emitting)."""
    self.host_seconds.inc(seconds - wait_seconds)
    self.device_wait_seconds.inc(wait_seconds)
    self._host["steps"] += 1
    self._host["seconds"] += seconds - wait_seconds
    self._host["wait_seconds"] += wait_seconds

  def on_request_finished(self, ttft: float | None, tpot: float | None,
                          queue_time: float | None) -> None:
    for name, hist, value in (("ttft", self.ttft, ttft), ("tpot", self.tpot, tpot),
                              ("queue_time", self.queue_time, queue_time)):
      if value is not None:
        hist.observe(value)
        self._samples[name].append(value)

  def set_load(self, running: int, waiting: int, kv_utilization: float) -> None:
    """After every step."""
    self._samples["kv_cache_utilization"].append(kv_utilization)
    self.running.set(running)
    self.waiting.set(waiting)
    self.kv_util.set(kv_utilization)

  # Reading -------------------------------------------------------------------

  def serve(self, port: int, addr: str = "127.0.0.1"):
    """Serves this registry at http://addr:port/metrics from a daemon thread
    (prometheus_client's own server) until the process exits; returns the server
    (`server.server_port` is the port, useful with port 0)."""
    server, _ = prom.start_http_server(port, addr=addr, registry=self.registry)
    return server

  def samples(self, name: str, since: int = 0) -> list[float]:
    """Raw per-step or per-request samples of `name` (decode_batch_size,
    kv_cache_utilization, ttft, tpot, queue_time), from sample number `since` on
    (those still kept: the latest MAX_SAMPLES)."""
    return self._samples[name].since(since)

  def sample_count(self, name: str) -> int:
    """How many samples of `name` were ever taken: `samples(name, since=...)` of a
    later call reads the ones taken in between."""
    return self._samples[name].count()

  def prometheus_text(self) -> str:
    return prom.generate_latest(self.registry).decode()

  def snapshot(self) -> dict:
    """A JSON-ready summary: totals, rates and percentiles."""
    def value(metric, **labels):
      return self.registry.get_sample_value(metric, labels) or 0.0

    queries = value("ridgeline_prefix_cache_queries_tokens_total")
    hits = value("ridgeline_prefix_cache_hits_tokens_total")
    steps = {}
    for kind, acc in self._steps.items():
      steps[kind] = {
          "steps": int(acc["steps"]),
          "memory_bound_steps": int(acc["memory_bound"]),
          "tokens": int(acc["tokens"]),
          "seconds": acc["seconds"],
          # Intensity of all the work of this kind: total FLOPs over total bytes.
          "achieved_intensity": acc["flops"] / acc["bytes"] if acc["bytes"] else 0.0,
          "mfu": acc["mfu_x_s"] / acc["seconds"] if acc["seconds"] else 0.0,
          "mbu": acc["mbu_x_s"] / acc["seconds"] if acc["seconds"] else 0.0,
      }
    return {
        "ridge_point": self.ridge_point,
        "decode_batch_size": _summary(self._samples["decode_batch_size"].since()),
        "kv_cache_utilization": value("ridgeline_kv_cache_utilization"),
        "requests_running": int(value("ridgeline_requests_running")),
        "requests_waiting": int(value("ridgeline_requests_waiting")),
        "prefix_cache": {"queried_tokens": int(queries), "hit_tokens": int(hits),
                         "hit_rate": hits / queries if queries else 0.0,
                         "evictions": int(value("ridgeline_prefix_cache_evictions_total")),
                         "host_tier": {
                             "hit_tokens": int(value("ridgeline_kv_host_hit_tokens_total")),
                             "hit_rate": (value("ridgeline_kv_host_hit_tokens_total") / queries
                                          if queries else 0.0),
                             "loaded_tokens": int(value("ridgeline_kv_host_loaded_tokens_total")),
                             "recomputed_tokens": int(value(
                                 "ridgeline_kv_host_recomputed_tokens_total")),
                             "bytes_to_host": int(value("ridgeline_kv_host_bytes_total",
                                                        direction="to_host")),
                             "bytes_to_device": int(value("ridgeline_kv_host_bytes_total",
                                                          direction="to_device")),
                             "evictions": int(value("ridgeline_kv_host_evictions_total")),
                             "pages": int(value("ridgeline_kv_host_pages"))}},
        "preemptions": int(value("ridgeline_preemptions_total")),
        "prompt_tokens": int(value("ridgeline_prompt_tokens_total")),
        "generation_tokens": int(value("ridgeline_generation_tokens_total")),
        "steps": steps,
        "host": {**self._host, "ms_per_step": (1e3 * self._host["seconds"] / self._host["steps"]
                                               if self._host["steps"] else 0.0)},
        "ttft_s": _summary(self._samples["ttft"].since()),
        "tpot_s": _summary(self._samples["tpot"].since()),
        "queue_time_s": _summary(self._samples["queue_time"].since()),
    }


def _summary(values: list[float]) -> dict:
  return percentiles(values, count=True, maximum=True) or {"count": 0}
