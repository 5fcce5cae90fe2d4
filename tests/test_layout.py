"""The packages depend on each other in one direction only, as their docstrings say.

    bundle   ← training, serving, scoring   (the contract: no BentoML, no torch)
    cifar10  → training, scoring            (the command line)
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("bundle", "cifar10", "scoring", "serving", "training")
# what each package may import from the others, and the third-party packages it must not
ALLOWED = {
    "bundle": set(),
    "serving": {"bundle"},
    "scoring": {"bundle", "cifar10"},  # cifar10.errors: the command line's error type
    "training": {"bundle", "cifar10"},
    "cifar10": {"bundle", "scoring", "training"},
}
FORBIDDEN = {
    "bundle": {"bentoml", "torch", "torchvision", "starlette", "pyspark"},
    "serving": {"torch", "torchvision", "pyspark"},
    "scoring": {"bentoml", "torch", "torchvision", "starlette"},
    "training": {"bentoml", "starlette", "pyspark"},
    "cifar10": {"bentoml"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module the file imports, at module level or inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_the_layout_allows(package):
    for path in sorted((REPO / package).glob("*.py")):
        roots = imported_roots(path)
        others = (roots & set(PACKAGES)) - {package}
        assert others <= ALLOWED[package], f"{path.relative_to(REPO)} imports {sorted(others - ALLOWED[package])}"
        assert not roots & FORBIDDEN[package], f"{path.relative_to(REPO)} imports {sorted(roots & FORBIDDEN[package])}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from serving.settings import Settings\n    import torch.nn\n")
    assert imported_roots(source) == {"os", "serving", "torch"}
