"""Runs ridgeline.cli.benchmark (cli/benchmark.py), the `ridgeline-bench` command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.benchmark import run

if __name__ == "__main__":
  run()
