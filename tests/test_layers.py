"""The driver side imports without torch, transformers or nnsight: every module under jobs/ and
driver.py, in a fresh interpreter where those three cannot be imported. The layering itself
(pyproject.toml [tool.importlinter]) is checked by `lint-imports` in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCKED = ("torch", "transformers", "nnsight")

PROBE = """
import importlib, importlib.abc, sys

BLOCKED = {blocked!r}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} imported on the driver side")
        return None


sys.meta_path.insert(0, Refuse())
for module in {modules!r}:
    importlib.import_module(module)
print("imported", len({modules!r}))
"""


def driver_side_modules() -> list[str]:
    modules = ["driver"]
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_jobs_and_driver_import_without_torch_transformers_or_nnsight():
    modules = driver_side_modules()
    assert "jobs.run" in modules and "jobs.results.report" in modules
    probe = PROBE.format(blocked=BLOCKED, modules=modules)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout
