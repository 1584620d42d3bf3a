"""Runs ridgeline.cli.batch_generate (cli/batch_generate.py), the `ridgeline-batch` command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.batch_generate import run

if __name__ == "__main__":
  run()
