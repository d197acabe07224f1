"""`call-pipeline serve` and `ui` from installed wheels, not a checkout: the wheels are built from
the project's files, installed into a fresh virtualenv, and run from an empty folder; `serve` from
call_pipeline's wheel alone, `ui` with call_pipeline_tools' wheel beside it (the simulator, the
demo CRM). The fresh virtualenv gets the dependencies from this one's site-packages through a .pth
file (installing Dagster again would take minutes); the project itself comes only from the wheels."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline_tests.serve_harness import Served, describe, free_port, wait_until

# the session's wheels and virtualenvs are built once: every test of this file on one xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("installed_wheels")]


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def call_pipeline(self) -> Path:
        return self.venv / "bin" / "call-pipeline"


@dataclass(frozen=True)
class Wheels:
    main: Path  # call_pipeline
    tools: Path  # call_pipeline_tools (tools/): the simulator, the demo, the UI's demo, the benchmark


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Wheels:
    root = tmp_path_factory.mktemp("wheels")
    # The wheels are built from copies: a build leaves build/ and *.egg-info behind.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "dagster.yaml"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    shutil.copytree(PROJECT_ROOT / "call_pipeline", source / "call_pipeline", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    # beside call_pipeline, where the `call_pipeline*` pattern of setuptools would take them in
    shutil.copytree(PROJECT_ROOT / "tools" / "call_pipeline_tools", source / "call_pipeline_tools",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT_ROOT / "call_pipeline_tests", source / "call_pipeline_tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    tools_source = root / "tools_source"
    tools_source.mkdir()
    shutil.copy(PROJECT_ROOT / "tools" / "pyproject.toml", tools_source / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "tools" / "call_pipeline_tools", tools_source / "call_pipeline_tools",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = root / "out"
    for folder in (source, tools_source):
        _build_wheel(folder, out)
    (main,) = out.glob("call_pipeline-*.whl")
    (tools,) = out.glob("call_pipeline_tools-*.whl")
    return Wheels(main, tools)


def _uv() -> bool:
    """uv is in the environment when `./run.sh setup` installed with it (its fallback is pip)."""
    return importlib.util.find_spec("uv") is not None


def _build_wheel(folder: Path, out: Path) -> None:
    # uv builds offline, from its cache, which set-up filled with the same build requirements; pip
    # makes a fresh build environment and installs setuptools into it for each wheel. Where set-up
    # fell back to pip (uv could not reach its index), the cache is empty and pip builds.
    if _uv() and subprocess.run([sys.executable, "-m", "uv", "build", "--wheel", "-q", "--offline", "--out-dir",
                                 str(out), str(folder)], timeout=300).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(folder), "--no-deps", "-q", "-w", str(out)],
                   check=True, timeout=300)


def _install(root: Path, *wheel_files: Path) -> Installed:
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # --compile-bytecode: pip writes the .pyc files at install, uv only when asked (run.sh's reason)
    python = str(venv / "bin" / "python")
    install = ([sys.executable, "-m", "uv", "pip", "install", "--python", python, "--compile-bytecode", "--offline"]
               if _uv() else [sys.executable, "-m", "pip", "--python", python, "install", "--no-index"])
    subprocess.run([*install, "-q", "--no-deps", *map(str, wheel_files)], check=True, timeout=300)
    site_packages = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # This environment's dependencies, after the fresh site-packages on sys.path; a path in a .pth
    # file does not run that folder's own .pth files, so this checkout's editable finders stay out.
    (site_packages / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return Installed(venv, site_packages)


@pytest.fixture(scope="module")
def installed(wheels, tmp_path_factory) -> Installed:
    """call_pipeline's wheel alone: what the code location's machines install."""
    return _install(tmp_path_factory.mktemp("installed"), wheels.main)


@pytest.fixture(scope="module")
def installed_with_tools(wheels, tmp_path_factory) -> Installed:
    return _install(tmp_path_factory.mktemp("installed_with_tools"), wheels.main, wheels.tools)


def _env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if name not in ("DAGSTER_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_the_project_comes_from_the_wheel(installed, tmp_path):
    result = subprocess.run(
        [str(installed.python), "-c", "import call_pipeline, call_pipeline.serve as s; "
                                      "print(call_pipeline.__file__); print(len(s.packaged_instance_yaml()))"],
        cwd=tmp_path, env=_env(), check=True, capture_output=True, text=True)
    module_file, yaml_chars = result.stdout.split()
    assert Path(module_file).is_relative_to(installed.site_packages), module_file
    assert int(yaml_chars) == len((PROJECT_ROOT / "dagster.yaml").read_text(encoding="utf-8"))
    # a copy in the wheel, not the checkout's link
    packaged = installed.site_packages / "call_pipeline" / "dagster.yaml"
    assert packaged.is_file() and not packaged.is_symlink()


def test_the_wheel_holds_no_tools_and_no_tests(wheels):
    with zipfile.ZipFile(wheels.main) as wheel:
        names = wheel.namelist()
    assert any(name.startswith("call_pipeline/") for name in names), names
    tools = [name for name in names if name.startswith(("call_pipeline/simulator/", "call_pipeline/bench",
                                                         "call_pipeline/demo", "call_pipeline_tools/"))]
    assert not tools, tools
    tests = [name for name in names if name.startswith("call_pipeline_tests/")]
    assert not tests, tests


def test_the_tools_commands_say_how_to_install_the_tools(installed, tmp_path):
    result = subprocess.run([str(installed.call_pipeline), "demo"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: `call-pipeline demo` needs the call_pipeline_tools package, which is not installed: "
        "`pip install -e tools` in the project's checkout (./run.sh setup does)"], result.stderr
    assert not (tmp_path / "data").exists()


def _assert_from_the_venv(served: Served, installed: Installed) -> None:
    for proc in served.family()[1:]:
        assert proc.cmdline()[0] == str(installed.python), describe(proc)


def test_serve_runs_from_the_wheel_in_an_empty_folder(installed, tmp_path, sqlite_url, simulator):
    env = {**_env(), "CALL_PIPELINE_CRM_URL": sqlite_url, "ALIBABA_CLOUD_ACCESS_KEY_ID": "ak",
           "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "sk", "OUTBOUNDBOT_INSTANCE_ID": "inst",
           "OUTBOUNDBOT_ENDPOINT": simulator.endpoint, "OUTBOUNDBOT_PROTOCOL": "http", "DASHSCOPE_API_KEY": "sk",
           "DASHSCOPE_HTTP_BASE_URL": simulator.dashscope_base_url}
    folder = tmp_path / "empty"
    folder.mkdir()
    home = folder / "data" / "dagster_home"
    with Served([str(installed.call_pipeline), "serve", "--no-ui"], env, folder, home) as served:
        served.wait_for_daemon()
        _assert_from_the_venv(served, installed)
        code, left = served.stop(signal.SIGTERM)
        assert not left, [describe(p) for p in left]
        assert code == 0, served.log()[-4000:]
    assert (home / "dagster.yaml").is_file()


def test_ui_runs_from_the_wheel_in_an_empty_folder(installed_with_tools, tmp_path):
    installed = installed_with_tools
    folder = tmp_path / "empty"
    folder.mkdir()
    port, sim_port = free_port(), free_port()
    command = [str(installed.call_pipeline), "ui", "--port", str(port), "--simulator-port", str(sim_port)]
    with Served(command, _env(), folder, folder / "data" / "ui" / "dagster_home") as served:
        served.wait_for_daemon()

        def loaded() -> bool:
            served.running()
            query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
            try:
                entries = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query},
                                        timeout=5).json()["data"]["workspaceOrError"]["locationEntries"]
            except (requests.RequestException, KeyError, TypeError):
                return False
            return any(entry["loadStatus"] == "LOADED" for entry in entries)

        wait_until(loaded, 180, "the webserver's code location")
        _assert_from_the_venv(served, installed)
        # the demo's data under the folder it runs in, nothing written into the installation
        assert (folder / "data" / "ui" / "crm.sqlite3").is_file()
        assert not list(installed.venv.rglob("*.sqlite3"))
        code, left = served.stop(signal.SIGTERM)
        assert not left, [describe(p) for p in left]
        assert code == 0, served.log()[-4000:]
