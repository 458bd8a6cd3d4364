"""The algorithm modules import only the standard library, torch and numpy."""
import ast
import subprocess
import sys
from pathlib import Path

ALGO = Path(__file__).resolve().parents[1] / "ibtpo_core" / "algo"
ALLOWED_FIRST_PARTY = {"ibtpo_core.algo", "ibtpo_core.registry", "ibtpo_core.engines.base"}


def test_algo_imports_are_stdlib_torch_numpy():
    bad = []
    for path in ALGO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in ("torch", "numpy") or top in sys.stdlib_module_names:
                    continue
                if any(name == p or name.startswith(p + ".") for p in ALLOWED_FIRST_PARTY):
                    continue
                bad.append(f"{path.name}: {name}")
    assert not bad, bad


def test_importing_the_algorithm_loads_no_framework():
    code = (
        "import sys, ibtpo_core.algo.tree, ibtpo_core.algo.ib_score, ibtpo_core.algo.advantages,"
        " ibtpo_core.algo.losses, ibtpo_core.algo.selection, ibtpo_core.algo.sampling,"
        " ibtpo_core.algo.rewards, ibtpo_core.algo.tree_score;"
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(eval(out))
    for framework in (
        "transformers",
        "prefect",
        "mlflow",
        "deepspeed",
        "pydantic",
        "datasets",
        "yaml",
    ):
        assert framework not in loaded, framework


def _first_party_imports(folder: Path) -> list[tuple[str, str]]:
    """(file, module) for every import anywhere in ``folder``'s modules, nested ones included."""
    out = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(folder.parent)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((str(path.relative_to(folder.parent)), node.module))
    return out


def test_the_library_imports_nothing_of_the_application_built_on_it():
    # dependencies point down (tests/test_layers.py): ibtpo -> flows -> tasks -> pipeline ->
    # configs -> ibtpo_core
    above = ("flows", "tasks", "pipeline", "configs")
    bad = [f"{f}: {m}" for f, m in _first_party_imports(ALGO.parent) if m.split(".")[0] in above]
    assert not bad, bad


def test_the_check_would_see_a_nested_import(tmp_path):
    lib = tmp_path / "ibtpo_core"
    lib.mkdir()
    (lib / "x.py").write_text("def f():\n    from flows.train import train\n")
    assert ("ibtpo_core/x.py", "flows.train") in _first_party_imports(lib)
