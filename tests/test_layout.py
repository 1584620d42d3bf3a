"""The house's rules, checked on the source: imports run only downward through the
floors (util < model < configs < engine < frontends < tools < cli), every import of
the project is through the `ridgeline` namespace, and no module outside tests
(scripts included) outgrows a reader (about 400 lines) unless it is listed here with its reason."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOORS = ("util", "model", "configs", "engine", "frontends", "tools", "cli")
MAX_LINES = 400
# Modules allowed past MAX_LINES, and why.
LONG_MODULES: dict[str, str] = {}


def _modules():
  for floor in FLOORS:
    yield from sorted((ROOT / floor).rglob("*.py"))


def _imports(path: pathlib.Path):
  """Every absolute import in the file, at any depth (functions too)."""
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.lineno, node.module
      for alias in node.names:  # `from ridgeline import util`
        yield node.lineno, f"{node.module}.{alias.name}"


def test_imports_only_run_downward():
  wrong = []
  for path in _modules():
    rel = path.relative_to(ROOT)
    floor = FLOORS.index(rel.parts[0])
    for line, name in _imports(path):
      parts = name.split(".")
      if parts[0] in FLOORS or parts[0] == "ridgeline_cli":
        wrong.append(f"{rel}:{line} imports {name} outside the ridgeline namespace")
      elif parts[0] == "ridgeline" and len(parts) > 1 and parts[1] in FLOORS:
        if FLOORS.index(parts[1]) > floor:
          wrong.append(f"{rel}:{line} ({rel.parts[0]}) imports {name}, a higher floor")
  assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_frontend_or_tool():
  # The floor rule above, said for the core by name: the engine runs without them.
  for path in (ROOT / "engine").rglob("*.py"):
    for _, name in _imports(path):
      assert not name.startswith(("ridgeline.frontends", "ridgeline.tools", "ridgeline.cli")), (
          path, name)


def test_modules_stay_readable():
  paths = [*_modules(), *sorted((ROOT / "scripts").glob("*.py"))]
  long = {str(p.relative_to(ROOT)): n for p in paths for n in [len(p.read_text().splitlines())]
          if n > MAX_LINES}
  unexplained = {k: v for k, v in long.items() if k not in LONG_MODULES}
  assert not unexplained, f"modules over {MAX_LINES} lines: {unexplained}"
  stale = [k for k in LONG_MODULES if k not in long]
  assert not stale, f"LONG_MODULES lists modules that are short now: {stale}"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_import_through_the_namespace(script):
  for line, name in _imports(ROOT / "scripts" / script):
    assert name.split(".")[0] not in FLOORS + ("ridgeline_cli",), (script, line, name)
