"""Runs ridgeline.cli.serve (cli/serve.py), the `ridgeline-serve` command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.serve import run

if __name__ == "__main__":
  run()
