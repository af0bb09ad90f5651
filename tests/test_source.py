"""The source stays readable: no module of the library over 600 lines, no function over 150 but the
two Triton kernels (whose parameter lists come from their argument tables), and the layers'
import rules of docs/architecture.md."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "fastlstm"
MODULES = sorted(SOURCE.rglob("*.py"))
LONG_FUNCTIONS_ALLOWED = {"forward_kernel", "backward_kernel"}


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SOURCE)) for p in MODULES])
def test_module_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 600, f"{path.name}: {len(text.splitlines())} lines"
    for fn in _functions(ast.parse(text)):
        length = fn.end_lineno - fn.lineno + 1
        assert length <= 150 or fn.name in LONG_FUNCTIONS_ALLOWED, f"{fn.name}: {length} lines"


# What each layer may import from the library (docs/architecture.md).
ALLOWED = {
    "options": set(), "weights": set(), "masks": {"options"}, "packing": set(), "checks": set(), "autocasting": {"weights"},
    "streaming": {"checks", "engines", "weights"}, "conversion": set(),
    "reference": {"masks", "options", "weights"}, "testing": {"masks", "options", "weights"},
    "convert": {"options", "weights"},
    "engines": {"engines", "masks", "options", "packing", "reference", "weights"},
    "exporting": {"convert", "options", "reference", "weights"},
    "functional": {"engines", "exporting", "masks", "options", "packing", "reference", "weights"},
    "modules": {"autocasting", "checks", "conversion", "exporting", "functional", "engines", "masks", "options",
                "streaming", "weights"},
    "interop": {"convert", "modules"},
    "onnx": {"exporting", "modules", "options", "convert"},
    "cli": {"modules", "bench", "demo"},
    "bench": {"bench", "engines", "modules", "onnx", "options", "weights", "testing"},
    "demo": {"demo", "engines", "modules"},
}


def _layer(path: Path) -> str:
    return path.relative_to(SOURCE).parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(SOURCE).parent.parts)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [target[0]] if target else [alias.name for alias in node.names]
            found.update(names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastlstm."):
            found.add(node.module.split(".")[1])
    return found - {"__init__", "__version__"}  # (the package root)


@pytest.mark.parametrize("path", [p for p in MODULES if _layer(p) in ALLOWED],
                         ids=[str(p.relative_to(SOURCE)) for p in MODULES if _layer(p) in ALLOWED])
def test_layers_import_only_what_the_architecture_allows(path):
    layer = _layer(path)
    extra = _imported_layers(path) - ALLOWED[layer] - {layer}
    assert not extra, f"{path.relative_to(SOURCE)} ({layer}) imports {sorted(extra)}"
