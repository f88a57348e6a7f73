"""The wheel carries the recipes, task templates and model configs, and an installed copy finds them."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_its_data_and_an_installed_copy_resolves_it(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("gift_quant-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, ext, package in (("recipes", "yaml", "recipes"), ("evaluation/tasks", "yaml", "tasks"),
                                 ("gift_quant/configs", "json", "configs")):
        shipped = {f"gift_quant/{package}/{p.name}" for p in (ROOT / folder).glob(f"*.{ext}")}
        assert shipped and shipped <= names, shipped - names

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel),
                              "-q"], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    code = """
import json, gift_quant
from pathlib import Path
from gift_quant.evaluate import offline_tasks
from gift_quant.plan import shipped_configs
from gift_quant.recipe_file import load_recipe
tasks = offline_tasks(Path("filled"))
print(json.dumps({"file": gift_quant.__file__, "recipe": load_recipe("smollm2-135m-instruct-w3").name,
                  "tasks": sorted(p.name for p in tasks.glob("gq_*.yaml")), "configs": len(shipped_configs())}))
"""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    run = subprocess.run([sys.executable, "-c", code], cwd=empty, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(target))  # the installed copy, not the checkout
    shipped = len(list((ROOT / "gift_quant/configs").glob("*.json")))
    assert got["recipe"] == "smollm2-135m-instruct-w3" and got["configs"] == shipped  # every config of the checkout
    assert "gq_piqa.yaml" in got["tasks"] and "${" not in (empty / "filled/gq_piqa.yaml").read_text()
