"""detector.base.threads: the wait policy, the thread count and the shared --threads option."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from detector.base import threads


@pytest.fixture
def clean_env(monkeypatch):
    """No OpenMP settings in the environment; torch's thread count restored afterwards."""
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_import_and_configure_without_torch():
    # a tool calls configure_threads before anything imports torch: the module must not import it
    code = ("import sys; from detector.base import threads; n = threads.configure_threads(3); "
            "import os; print(n, os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["3", "3", "PASSIVE", "False"]


def test_torch_starts_with_the_configured_threads():
    code = ("from detector.base import threads; threads.configure_threads(2); import torch; "
            "print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "2"


def test_explicit_threads_win_and_reach_an_imported_torch(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.configure_threads(2) == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_user_settings_are_kept(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "1")
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.configure_threads() == 1
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    clean_env.setenv("OMP_NUM_THREADS", "4,2")  # nested levels: the first is the intra-op count
    assert threads.configure_threads(None) == 4


def test_default_is_the_usable_cores_capped_and_shared_by_processes(clean_env):
    clean_env.setattr(threads, "usable_cores", lambda: 64)
    assert threads.default_threads() == threads.MAX_DEFAULT_THREADS
    clean_env.setattr(threads, "usable_cores", lambda: 6)
    assert threads.configure_threads() == 6
    clean_env.delenv("OMP_NUM_THREADS")
    assert threads.configure_threads(processes=4) == 1  # 6 // 4
    clean_env.delenv("OMP_NUM_THREADS")
    assert threads.configure_threads(processes=12) == 1  # never below one
    with pytest.raises(ValueError):
        threads.configure_threads(-1)


def test_usable_cores_is_at_most_the_affinity():
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_threads_option():
    parser = argparse.ArgumentParser()
    threads.add_threads_argument(parser)
    assert parser.parse_args([]).threads is None
    assert parser.parse_args(["--threads", "3"]).threads == 3
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])
