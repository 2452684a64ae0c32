"""The package's shape: imports run one way, generation and evaluation never need training, and each module
stays small unless its docstring says which single idea it holds."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Lower layers never import higher ones; a package may import its own modules and anything below it.
LAYERS = [
    {"ssi.files", "ssi.config", "ssi.versions", "ssi.dtypes", "ssi.devices", "ssi.locations", "ssi.overrides"},
    {"ssi.hf_dir"},
    {"ssi.vocab", "ssi.run_dir"},
    {"ssi.encode"},  # audio sources and decoding: read by the unit encoders and by the audio data path
    {"ssi.model", "ssi.loggers"},
    {"ssi.data", "ssi.testing"},
    {"ssi.eval"},
    {"ssi.generate", "ssi.train"},
    {"ssi.report"},
]


def unit_of(module: str) -> str:
    """The package (ssi.vocab, ssi.train...) or top-level module a dotted module name belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def imports() -> dict[str, set[str]]:
    """ssi module -> the ssi modules it imports (from ssi.x import y counts as ssi.x.y when that is a module)."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssi"):
                targets.add(node.module)
                targets.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if (SRC / node.module.replace(".", "/") / f"{a.name}.py").exists()
                )
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("ssi"))
        found[module] = targets
    return found


def layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{unit} is in no layer of tests/test_layout.py: place it")


def test_imports_point_down_the_layers_only() -> None:
    wrong = []
    for module, targets in imports().items():
        if module == "ssi":
            continue
        here = unit_of(module)
        for target in targets:
            there = unit_of(target)
            if there not in ("ssi", here) and layer_of(there) >= layer_of(here):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_generation_and_evaluation_never_import_training() -> None:
    offenders = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        if unit_of(module) in ("ssi.generate", "ssi.eval")
        for target in targets
        if unit_of(target) == "ssi.train"
    ]
    assert not offenders


def test_long_modules_say_which_single_idea_they_hold() -> None:
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 450:
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "One idea" in docstring, f"{path} has {len(lines)} lines: split it, or say which idea it holds"
