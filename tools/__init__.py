"""The tools: benchmarks (bench/, serve_bench) and the quantization evaluation. They
drive the core and the frontends; nothing below imports them."""
