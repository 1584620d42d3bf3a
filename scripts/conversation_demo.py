"""Runs ridgeline.cli.conversation_demo (cli/conversation_demo.py), its command, from a source tree
that `make setup` installed (editable, so this checkout's code is what runs). The code
and --help live there."""

from ridgeline.cli.conversation_demo import run

if __name__ == "__main__":
  run()
