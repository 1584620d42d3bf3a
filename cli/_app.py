"""What every command shares: one-line errors, a --help that lists the command's
own flags and the shared model/engine flags, and quiet library logging.

Errors print as one line on stderr (`error: ...`) with exit status 1 (2 for a bad
flag); `--verbose` re-raises, so the traceback shows, and keeps INFO logs.
"""

from __future__ import annotations

import logging as std_logging
import re
import sys
from typing import Callable

from absl import app, flags, logging

flags.DEFINE_bool("verbose", False, "On an error, show the whole traceback; keep the "
                  "libraries' INFO logs (absl, orbax).")
FLAGS = flags.FLAGS

_HELP = ("-h", "--help", "-?", "--helpshort", "--help=true", "--helpshort=true")
SHARED_MODULES = ("ridgeline.cli.flags_common", __name__)


def one_line(e: BaseException) -> str:
  """An exception as one line: its message with whitespace runs collapsed."""
  text = re.sub(r"\s+", " ", str(e)).strip()
  if isinstance(e, KeyError) and text:
    text = f"missing {text}"
  if not text or not isinstance(e, (ValueError, OSError, RuntimeError, app.UsageError,
                                    KeyError, NotImplementedError)):
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text


def usage(doc: str | None, module: str) -> str:
  """The command's docstring, its own flags, then the shared ones it uses."""
  parts = [(doc or "").strip(), ""]
  own = FLAGS.module_help(module).strip()
  parts += ["Flags of this command:", _indent_body(own) if own else "  (none)", ""]
  for name in SHARED_MODULES:
    if name in sys.modules and name != module:
      shared = FLAGS.module_help(name).strip()
      if shared:
        title = ("Model and engine flags (shared by the commands):"
                 if name.endswith("flags_common") else "Common flags:")
        parts += [title, _indent_body(shared), ""]
  parts.append("--helpfull lists every flag, the libraries' included.")
  return "\n".join(parts)


def _indent_body(help_text: str) -> str:
  # module_help starts with "module.name:"; the title above replaces it.
  lines = help_text.splitlines()
  if lines and lines[0].endswith(":") and not lines[0].startswith(" "):
    lines = lines[1:]
  return "\n".join(lines)


def _parse(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as e:
    text = re.sub(r"\s+", " ", str(e)).strip()
    print(f"error: {text} (see --help)", file=sys.stderr)
    sys.exit(2)


def quiet_logs() -> None:
  """absl, orbax and JAX log at INFO (orbax: ~30 lines per checkpoint); a user
  wants warnings and errors only."""
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.WARNING)
  for name in ("absl", "orbax", "jax", "grain"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


def run(main: Callable[[list[str]], int | None], module: str) -> None:
  """absl's app.run with the shared --help and error handling. `module` is the
  __name__ of the module that defines the command's own flags."""
  doc = sys.modules[module].__doc__
  args = sys.argv[1:]
  if "--" in args:
    args = args[:args.index("--")]
  if any(a in _HELP for a in args):
    print(usage(doc, module))
    sys.exit(0)

  def wrapped(argv):
    if not FLAGS.verbose:
      quiet_logs()
    try:
      return main(argv)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      return 130
    except SystemExit:
      raise
    except app.UsageError as e:
      if FLAGS.verbose:
        raise
      print(f"error: {one_line(e)} (see --help)", file=sys.stderr)
      return 2
    except Exception as e:  # noqa: BLE001 -- every error becomes one line
      if FLAGS.verbose:
        raise
      print(f"error: {one_line(e)} (--verbose shows the traceback)", file=sys.stderr)
      return 1

  app.run(wrapped, flags_parser=_parse)
