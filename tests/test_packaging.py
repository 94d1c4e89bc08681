"""setup.py installs every top-level module the scripts import: a non-editable install, used from another
folder, runs train.py's and export.py's imports (a py_modules list once left out augment and export), and
finds the recipes and the phone page (a plain install once had neither: `--recipe fast` failed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_imports_every_script(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "GHOST_EXT": "0"}  # no compiled kernels: this is about the Python modules, and fast
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(REPO)], env=env, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    scripts = sorted(p.stem for p in REPO.glob("*.py") if p.stem != "setup")
    installed = sorted(p.stem for p in target.glob("*.py"))
    assert installed == scripts
    # from an empty folder, with only the installed copy on the path (not the repository)
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", "import " + ", ".join(scripts) + "; import ghost_ext; "
                          "print(train.__file__, export.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(f.startswith(str(target)) for f in run.stdout.split()), run.stdout
    # the folders that are no module: setup.py's data_files, found by common.project_dir
    share = target / "share" / "ghostcars"
    assert sorted(p.name for p in (share / "recipes").glob("*.yaml")) == \
        sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert all((share / "web" / f).is_file() for f in ("index.html", "app.js", "sw.js", "package.json"))
    found = subprocess.run([sys.executable, "-c", "import config, webapp; print(config.RECIPES_DIR, webapp.WEB); "
                            "print(' '.join(config.recipe_names())); "
                            "print(config.from_command_line(['--recipe', 'fast']).cfg.train.lr)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    dirs, names, lr = found.stdout.split("\n")[:3]
    assert dirs.split() == [str(share / "recipes"), str(share / "web")]
    assert names.split() == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    import config
    assert float(lr) == config.read_file(REPO / "recipes" / "fast.yaml")["lr"]


def test_project_dir_finds_an_installed_copy(tmp_path, monkeypatch):
    """A module installed without its folders beside it finds them under <data root>/share/ghostcars."""
    import common
    import sysconfig
    fake_module = tmp_path / "site" / "common.py"
    fake_module.parent.mkdir()
    monkeypatch.setattr(common, "__file__", str(fake_module))
    assert common.project_dir("recipes") == fake_module.parent / "recipes"  # neither: names the checkout's path
    data_root = tmp_path / "prefix"
    (data_root / "share" / "ghostcars" / "recipes").mkdir(parents=True)
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(data_root))
    assert common.project_dir("recipes") == data_root / "share" / "ghostcars" / "recipes"
    (fake_module.parent / "recipes").mkdir()
    assert common.project_dir("recipes") == fake_module.parent / "recipes"  # a checkout wins


def _project_imports(path: Path) -> set[str]:
    """The top-level names a file imports (module level and inside functions)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_one_way_imports():
    """Training, prediction and the benchmarks never import the evaluation script; inference never imports
    the augmentation module; the shared helpers import no script."""
    scripts = {p.stem for p in REPO.glob("*.py")}
    for path in [REPO / "train.py", REPO / "predict.py", REPO / "serve.py", *REPO.glob("benchmarks/*.py")]:
        assert "evaluate" not in _project_imports(path), path
    for name in ["predict", "evaluate", "export", "serve"]:
        assert "augment" not in _project_imports(REPO / f"{name}.py"), name
    assert not (_project_imports(REPO / "common.py") & scripts)
