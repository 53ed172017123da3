"""The tree's rule that keeps the GPU backend a second implementation, not a fork: models/ asks the
backend seam (models/backend.py) and imports nothing from the runtime, the kernels or numba."""
import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
    return names


def test_models_import_nothing_of_the_runtime():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        outside = {n for n in imports(path) if n.split(".")[0] in ("edgeseek", "numba")}
        assert outside <= {"edgeseek.errors"}, (path.name, outside)
