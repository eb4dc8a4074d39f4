"""The package's layers: every module imports only from the layers below its own."""

import ast
import os

import pytest

from tests.tiny import REPO

# Bottom to top; docs/design.md's layout section draws the same stack. Within a
# layer, a folder or module imports only from itself.
LAYERS = (
    ("errors", "answers"),
    ("config_base", "run_dir"),
    ("config_loading", "stages", "recipes"),
    ("models", "data"),
    ("parallel", "flops"),
    ("routing", "objective"),
    ("evaluation",),
    ("training",),
    ("serving",),
    ("main", "ablate", "plan", "evaluate"),
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
PACKAGE = os.path.join(REPO, "coe_jax")


def _modules() -> list[str]:
  """Every module's path under coe_jax/, but the package's own __init__.py."""
  paths = [
      os.path.relpath(os.path.join(parent, name), PACKAGE)
      for parent, _, names in os.walk(PACKAGE)
      for name in names
      if name.endswith(".py")
  ]
  return sorted(p for p in paths if p != "__init__.py")


def _unit(relative_path: str) -> str:
  """The layer unit of a module: its folder under coe_jax/, or its own name."""
  return relative_path.split(os.sep)[0].removesuffix(".py")


def _imported_units(relative_path: str) -> set[str]:
  with open(os.path.join(PACKAGE, relative_path), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  units = set()
  for node in ast.walk(tree):  # Function-level imports count too.
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "coe_jax" and len(parts) > 1 and parts[1] in LAYER_OF:
        units.add(parts[1])
  return units


def test_every_module_belongs_to_a_layer():
  units = {_unit(m) for m in _modules()}
  assert units <= set(LAYER_OF), units - set(LAYER_OF)


@pytest.mark.parametrize("module", _modules())
def test_nothing_imports_upward_or_sideways(module):
  unit = _unit(module)
  for imported in _imported_units(module) - {unit}:
    assert LAYER_OF[imported] < LAYER_OF[unit], (
        f"{module} (layer {LAYER_OF[unit]}, {unit}) imports {imported} "
        f"(layer {LAYER_OF[imported]})")
