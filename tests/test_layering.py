"""The package layering of DESIGN.md §3: imports point down the table, and every package below
``jobs`` works without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("feature_store", "quantizer", "mm_encoder", "pipelines", "recsys", "jobs")

#: The project packages each package may import (everything else in PACKAGES is refused).
ALLOWED = {
    "feature_store": set(),
    "quantizer": set(),
    "mm_encoder": set(),
    "pipelines": {"feature_store", "quantizer", "mm_encoder"},
    "recsys": {"feature_store"},
    "jobs": set(PACKAGES),
}
#: Libraries a package must not know about (mm_encoder: no Spark, no TorchRec).
FORBIDDEN_LIBRARIES = {"mm_encoder": {"pyspark", "torchrec", "fbgemm_gpu"},
                       "quantizer": {"pyspark", "torchrec"},
                       "feature_store": {"torch", "torchrec"}}


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every import in the file, including imports inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_the_package_table(package):
    bad = []
    for path in _modules(package):
        roots = _imported_roots(path)
        for other in (set(PACKAGES) - {package} - ALLOWED[package]) & roots:
            bad.append(f"{path.relative_to(REPO)} imports {other}")
        for lib in FORBIDDEN_LIBRARIES.get(package, set()) & roots:
            bad.append(f"{path.relative_to(REPO)} imports {lib}")
    assert not bad, "\n".join(bad)


def test_every_module_below_jobs_imports_with_jobs_blocked():
    """Import every module of the packages below ``jobs`` in a fresh interpreter in which any
    import of ``jobs`` raises."""
    code = r"""
import importlib, importlib.abc, pkgutil, sys

class BlockJobs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "jobs" or name.startswith("jobs."):
            raise ImportError(f"{name} is blocked: packages below jobs must not import it")
        return None

sys.meta_path.insert(0, BlockJobs())
imported = []
for pkg in ("feature_store", "quantizer", "mm_encoder", "pipelines", "recsys"):
    mod = importlib.import_module(pkg)
    imported.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
assert not any(m == "jobs" or m.startswith("jobs.") for m in sys.modules), "jobs was imported"
print(len(imported), "modules", " ".join(imported))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    count, _, names = res.stdout.strip().splitlines()[-1].partition(" modules ")
    expected = {f"{p}.{m.stem}" for p in PACKAGES[:-1] for m in (REPO / p).glob("*.py")
                if m.stem != "__init__"}
    assert expected <= set(names.split()), expected - set(names.split())
