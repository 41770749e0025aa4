"""The tools as console scripts (setup.cfg): each ``gdet-*`` runs ``detector.apps.X:cli``, the same code as
``python tools/X.py`` in a checkout, and a plain (non-editable) install carries the tools and the default model."""

from __future__ import annotations

import configparser
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # console script -> the app module (tools/<module>.py in a checkout)
    "gdet-detect": "detect",
    "gdet-benchmark": "benchmark_map",
    "gdet-precompute": "precompute_proposals",
    "gdet-recall": "proposal_recall",
    "gdet-train": "train_detector",
    "gdet-train-multibox": "train_multibox",
    "gdet-priors": "make_priors",
    "gdet-export": "export_detector",
    "gdet-make-vocab": "make_ilsvrc_vocab",
}


def declared() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def test_every_tool_is_a_declared_console_script():
    assert declared() == {script: f"detector.apps.{module}:cli" for script, module in SCRIPTS.items()}
    apps = {p.stem for p in (ROOT / "detector" / "apps").glob("*.py")} - {"__init__"}
    assert apps == set(SCRIPTS.values()) == {p.stem for p in (ROOT / "tools").glob("*.py")}


@pytest.mark.parametrize("module", sorted(SCRIPTS.values()))
def test_entry_points_import_and_answer_help(module, capsys):
    app = importlib.import_module(f"detector.apps.{module}")
    assert callable(app.main) and callable(app.cli)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
    # the checkout's tools/X.py runs the same function
    shim = (ROOT / "tools" / f"{module}.py").read_text()
    assert f"from detector.apps.{module} import cli\n" in shim and len(shim.splitlines()) <= 5


def test_the_installed_package_has_the_scripts():
    # the environment's install of this checkout (pip install -e .): rerun it after changing setup.cfg
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("gdet-")}
    assert installed == declared()


def test_console_script_runs_as_a_process(tmp_path):
    script = Path(sysconfig.get_path("scripts")) / "gdet-detect"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "usage: gdet-detect" in out.stdout
    assert "default model: chess pieces, 13 classes" in out.stdout
    bad = subprocess.run([str(script), str(tmp_path / "missing-folder" / "*.jpg")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: pattern") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_plain_install_works_without_the_checkout(tmp_path):
    """``pip install --target`` (not editable) of a copy of the checkout, run from elsewhere: the tools and the
    default model come with the package. Dependencies come from this environment's site-packages."""
    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "out", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    assert (site / "detector" / "resources" / "default_detector.safetensors").is_file()
    assert sorted(p.name for p in (site / "bin").iterdir()) == sorted(SCRIPTS)
    # -S: no site-packages .pth files, so the editable install of the checkout cannot be found
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_path("purelib")]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import detector.apps.detect as d, detector.base.checkpoint as c\n"
            "print(d.__file__); print(c.model_info(c.DEFAULT_MODEL).summary())")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=elsewhere,
                         env=env, timeout=120, check=True)
    assert out.stdout.startswith(str(site)) and "chess pieces, 13 classes" in out.stdout
    helped = subprocess.run([sys.executable, "-S", str(site / "bin" / "gdet-benchmark"), "--help"],
                            capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)
    assert helped.returncode == 0 and "usage: gdet-benchmark" in helped.stdout
