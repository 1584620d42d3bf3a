"""Runs ridgeline.cli.convert_checkpoint (cli/convert_checkpoint.py), the `ridgeline-convert` command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.convert_checkpoint import run

if __name__ == "__main__":
  run()
