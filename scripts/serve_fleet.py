"""Runs ridgeline.cli.serve_fleet (cli/serve_fleet.py), its command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.serve_fleet import run

if __name__ == "__main__":
  run()
