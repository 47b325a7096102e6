"""The architecture as a rule: the format layer at the top of mmdata, preprocessing and loading beside each
other in mmdata/prep and mmdata/load, never importing each other, and mmdata never importing mmtrain."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMAT_LAYER = ("schema.py", "shards.py", "dataset.py", "storage.py", "config.py", "verify/*.py")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(files, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{path.name} imports {module}" for path in files
                  for module in imported_modules(path)
                  if any(module == f or module.startswith(f + ".") for f in forbidden))


def test_prep_and_load_never_import_each_other():
    assert violations((ROOT / "mmdata/prep").rglob("*.py"), ("mmdata.load",)) == []
    assert violations((ROOT / "mmdata/load").rglob("*.py"), ("mmdata.prep",)) == []


def test_the_format_layer_imports_neither_prep_nor_load():
    files = [path for pattern in FORMAT_LAYER for path in sorted((ROOT / "mmdata").glob(pattern))]
    assert len(files) >= len(FORMAT_LAYER) and all(f.is_file() for f in files)
    assert violations(files, ("mmdata.prep", "mmdata.load")) == []


def test_mmdata_never_imports_mmtrain():
    assert violations((ROOT / "mmdata").rglob("*.py"), ("mmtrain",)) == []


def test_the_rule_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mmdata.load.loader import MultimodalLoader\n")
    assert violations([module], ("mmdata.load",)) != []
