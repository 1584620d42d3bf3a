"""Runs ridgeline_cli/serve_fleet.py from a source tree (installed: see pyproject's
[project.scripts]). The code and --help live there."""

import os
import sys

# The source tree first, so this checkout's packages are the ones imported.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ridgeline_cli.serve_fleet import run  # noqa: E402

if __name__ == "__main__":
  run()
