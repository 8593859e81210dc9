"""The wheel, installed into a fresh virtual environment, works on its own: a file missing
from the package (styles, the plugin hook module) fails here, not on a user's machine."""

import os
import subprocess
import sys
import venv

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = dist.glob("floe_assistant-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "FLOE_HOME": str(tmp_path / "home"), "FLOE_PLUGINS": ""}
    floe = env_dir / "bin" / "floe"
    version = subprocess.run([str(floe), "--version"], capture_output=True, text=True, env=env,
                             cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("floe ")
    doctor = subprocess.run([str(floe), "doctor"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in doctor.stdout
    check = ("from floe_app.paths import assets_dir; import floe_app.hookspecs;"
             "import floe_app.tui.app;"
             "assert (assets_dir() / 'floe.tcss').is_file(), assets_dir();"
             "from floe_app.federated.service import bundle_dir as b;"
             "assert (b() / 'pyproject.toml').is_file() and"
             " (b() / 'floe_bundle' / 'client.py').is_file(), b()")
    packaged = subprocess.run([str(python), "-c", check], capture_output=True, text=True,
                              env=env, cwd=tmp_path)
    assert packaged.returncode == 0, packaged.stderr
