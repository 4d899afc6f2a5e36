"""What the package declares matches what it does: the imports of ftjax/ against the runtime
dependencies and extras, one console script per scripts/*.py, and the pip extra named when an
optional package is missing."""

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import ml_collections
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ftjax.errors import MissingExtraError

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Declared but never imported by ftjax itself: what uses them instead.
INDIRECT = {
    "tokenizers": "transformers' fast tokenizers",
    "gcsfs": "gs:// workdirs through etils.epath",
    "google-cloud-storage": "gs:// for orbax and tensorboardX",
    "scikit-learn": "optuna's fANOVA importances in the search report",
}
# Extras that only point at other packages' builds or at the test environment.
NOT_IMPORTED_EXTRAS = {"tpu", "cuda", "dev"}


def _names(lines) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in lines}


def _runtime() -> set[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return _names(line for line in lines if line.strip() and not line.startswith("#"))


def _extras() -> dict[str, set[str]]:
    return {extra: _names(lines) for extra, lines in PYPROJECT["project"]["optional-dependencies"].items()
            if extra not in NOT_IMPORTED_EXTRAS}


def _imported() -> dict[str, set[str]]:
    """Distribution -> the ftjax files that import it (any import, lazy ones and
    ``ftjax.errors.require("module", ...)`` included)."""
    to_dist = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "ftjax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                tops = [node.args[0].value.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top == "ftjax":
                    continue
                assert top in to_dist, f"{path}: imports {top!r}, which no installed distribution provides"
                for dist in to_dist[top]:
                    found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_the_dependencies_are_the_imports():
    imported, runtime, extras = _imported(), _runtime(), _extras()
    optional = set().union(*extras.values())
    undeclared = {d: files for d, files in imported.items() if d not in runtime | optional}
    assert not undeclared, f"imported but not declared in requirements.txt or an extra: {undeclared}"
    unused = (runtime | optional) - set(imported) - set(INDIRECT)
    assert not unused, f"declared but never imported by ftjax/ (drop them or say why in INDIRECT): {unused}"
    assert not {"grain", "tqdm", "tensorflow-datasets", "torch"} & runtime
    assert set(INDIRECT) <= runtime | optional


def test_one_console_script_per_script():
    scripts = PYPROJECT["project"]["scripts"]
    targets = {target.split(":")[0].rsplit(".", 1)[1]: name for name, target in scripts.items()}
    assert set(targets) == {p.stem for p in (REPO / "scripts").glob("*.py")}
    assert {"ftjax-train", "ftjax-eval", "ftjax-export", "ftjax-serve", "ftjax-sweep",
            "ftjax-prepare"} <= set(scripts)
    for module, name in targets.items():  # the wrapper runs the very function the script names
        tree = ast.parse((REPO / "scripts" / f"{module}.py").read_text())
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [
            (f"ftjax.commands.{module}", ["run"])], module
        assert scripts[name] == f"ftjax.commands.{module}:run"


def test_missing_tfds_names_its_extra(monkeypatch):
    from ftjax.data import sources

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ModuleNotFoundError
    cfg = ml_collections.ConfigDict({"tfds": {"name": "glue/sst2", "data_dir": ""}})
    with pytest.raises(MissingExtraError, match=r"glue/sst2\[train\].*pip install 'ftjax\[tfds\]'"):
        sources._read_tfds(cfg, "train")


def test_missing_torch_names_its_extra(monkeypatch, tmp_path):
    from ftjax.models import loading

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"allow_pickle=True.*pip install 'ftjax\[torch\]'"):
        loading.folder_source(tmp_path, allow_pickle=True)
