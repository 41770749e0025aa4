"""proposals.jit.cached_njit: numba's disk cache where a folder can be written, compiling otherwise."""

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODULE = "from proposals.jit import cached_njit\n\n\n@cached_njit\ndef twice(x):\n    return 2 * x\n"


def run_module(tmp_path: Path, **env_vars) -> subprocess.CompletedProcess:
    """Import a one-function module from a folder whose ``__pycache__`` cannot be made (a file of that
    name, as in a read-only install) and call it in a fresh process."""
    folder = tmp_path / "pkg"
    folder.mkdir(exist_ok=True)
    (folder / "__pycache__").write_text("")
    (folder / "twice_mod.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env |= {"PYTHONPATH": os.pathsep.join([str(folder), str(PROJECT_ROOT)]), "PYTHONDONTWRITEBYTECODE": "1"}
    env |= env_vars
    return subprocess.run([sys.executable, "-W", "always", "-c", "import twice_mod; print(twice_mod.twice(21))"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_falls_back_to_the_user_cache_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = run_module(tmp_path, HOME=str(home))
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
    assert list((home / ".cache" / "numba").rglob("twice_mod.twice-*.nbi"))  # cached there
    assert "NUMBA_CACHE_DIR" not in done.stderr


def test_compiles_without_any_writable_cache_folder(tmp_path):
    # HOME under a regular file: ~/.cache cannot be created either; numba alone would refuse to import
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = run_module(tmp_path, HOME=str(blocker / "home"))
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
    assert "NUMBA_CACHE_DIR" in done.stderr  # the one warning
