"""The frontends: what turns the engine into a product. Each drives the core
(ridgeline.engine) and the core never imports them.

The OpenAI protocol and its server:
  openai_format     request bodies -> engine requests, OpenAI's errors
  openai_responses  engine outputs -> OpenAI's response and chunk bodies
  server            the FastAPI app (routes, the API key, /health, /metrics)
  completions       the completions' request path, on the engine driver
  tokenizer_api     vLLM's /tokenize, /detokenize and /tokenizer_info
  batch_api         OpenAI's Batch API: /v1/files and /v1/batches
  batch_store       its files and batch objects on disk
  batch_runner      its batches through the engine driver and the batch journal
The offline batch job (batch/): JSONL and OpenAI batch files in and out, exactly
once through one journal. The Ray fleet (fleet/): many engines for a batch job, and
a Serve fleet of servers.
"""
