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
    code = ("import sys, ibtpo_core.algo.tree, ibtpo_core.algo.ib_score, ibtpo_core.algo.advantages,"
            " ibtpo_core.algo.losses, ibtpo_core.algo.selection, ibtpo_core.algo.sampling,"
            " ibtpo_core.algo.rewards, ibtpo_core.algo.tree_score;"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    for framework in ("transformers", "prefect", "mlflow", "deepspeed", "pydantic", "datasets", "yaml"):
        assert framework not in loaded, framework
