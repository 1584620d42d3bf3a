"""Runs ridgeline.cli.generate (cli/generate.py), the `ridgeline-generate` command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.generate import run

if __name__ == "__main__":
  run()
