"""End to end: `grpo-suite dashboard serve` on a free port, looked at by headless Chromium (a screenshot and
the rendered DOM, which must name the run); and the command's own errors.

Chromium is installed with apt-get when missing (root only); without it the browser test is skipped and says
why. Slow (about 30 s with the install): `python -m pytest -m slow tests/dashboards/test_dash_e2e.py`.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.config import build_config
from dashboards.cli import register

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CLI = Path(sys.executable).with_name("grpo-suite")


def find_or_install_chromium() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(
            "headless Chromium is not installed and cannot be installed here (needs root and apt-get): "
            "run `apt-get install -y chromium` to enable this test"
        )
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    ):
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        if done.returncode != 0:
            pytest.skip(
                f"could not install Chromium ({' '.join(command)} failed): {done.stderr.strip()[-300:]}"
            )
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("apt-get installed the chromium package but no chromium binary is on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the dashboard exited early: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard did not answer on port {port} within {timeout} s")


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=15000",
    ]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_served_dashboard_renders_the_run_in_chromium(runs_root, tmp_path):
    browser = find_or_install_chromium()
    port = free_port()
    server = subprocess.Popen(
        [str(CLI), "dashboard", "serve", "--runs", str(runs_root), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_healthy(port, server)
        url = f"http://127.0.0.1:{port}/?run=toy/a"
        # The first view runs the app's imports in the server (seconds on a busy machine) while Chromium's
        # virtual time runs on: look again until the page has rendered.
        for attempt in range(6):
            dom = chromium(browser, tmp_path / f"dom{attempt}", "--dump-dom", url).stdout
            if "toy/a" in dom:
                break
        assert "toy/a" in dom  # the selected run's name, rendered by the page's script
        assert "Refused" not in dom
        from matplotlib.image import imread

        for attempt in range(3):
            shot = tmp_path / f"runs{attempt}.png"
            done = chromium(
                browser, tmp_path / f"shot{attempt}", f"--screenshot={shot}", "--window-size=1400,1000", url
            )
            assert shot.is_file(), done.stderr[-2000:]
            pixels = imread(shot)
            if pixels.std() > 0.05:
                break
        assert pixels.shape[:2] == (1000, 1400) and pixels.std() > 0.05, "the screenshot shows a blank page"
        for attempt in range(6):  # as above: a page may be dumped before its script has rendered it
            bad = chromium(
                browser, tmp_path / f"bad{attempt}", "--dump-dom", f"http://127.0.0.1:{port}/?run=../../etc"
            ).stdout
            if "Refused" in bad:
                break
        assert "Refused the run path in the URL" in bad
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_refuses_a_missing_runs_folder(tmp_path):
    # Only this app's parser: core.cli.main would import every installed app (tens of seconds here).
    parser = argparse.ArgumentParser(prog="grpo-suite")
    register(parser.add_subparsers(dest="app", required=True))
    args = parser.parse_args(["dashboard", "serve", "--runs", str(tmp_path / "nowhere"), "--port", "9999"])
    _, config_cls, run, presets = args._command
    config = build_config(config_cls, args, presets)
    assert (config.runs, config.port, config.address) == (str(tmp_path / "nowhere"), 9999, "127.0.0.1")
    with pytest.raises(FileNotFoundError, match=f"runs folder {tmp_path / 'nowhere'} does not exist"):
        run(config)


def test_serve_command_line(tmp_path):
    from dashboards.cli import ServeConfig, streamlit_command

    command = streamlit_command(ServeConfig(runs=str(tmp_path), port=8765))
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("dashboards/app.py")
    assert command[command.index("--server.port") + 1] == "8765"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="port"):
        ServeConfig(port=0)
