"""`grpo-suite dashboard serve --runs DIR --port N`: the Streamlit dashboards over a folder of runs.

Read-only: the server only reads run directories under DIR. It listens on 127.0.0.1 unless --address
says otherwise. Streamlit is imported by the server process only, so `grpo-suite --help` stays fast.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import add_app, add_command

APP_FILE = Path(__file__).with_name("app.py")


@dataclass
class ServeConfig:
    """Where the runs are and where the server listens."""

    runs: str = field(
        default="runs", metadata={"help": "folder holding run directories (searched 4 levels deep)"}
    )
    port: int = field(default=8501, metadata={"help": "TCP port of the web server"})
    address: str = field(
        default="127.0.0.1",
        metadata={"help": "address to listen on (0.0.0.0 exposes the runs to the network)"},
    )

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")


def streamlit_command(config: ServeConfig) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_FILE),
        "--server.port", str(config.port),
        "--server.address", config.address,
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
    ]  # fmt: skip


def serve(config: ServeConfig) -> None:
    runs = Path(config.runs).resolve()
    if not runs.is_dir():
        what = "is not a directory" if runs.exists() else "does not exist"
        raise FileNotFoundError(f"runs folder {runs} {what}")
    print(f"dashboard of {runs} on http://{config.address}:{config.port}", flush=True)
    # exec: the server becomes this process, so Ctrl-C and kill reach it directly.
    os.execve(sys.executable, streamlit_command(config), {**os.environ, "GRPO_SUITE_RUNS": str(runs)})


def register(apps) -> None:
    verbs = add_app(apps, "dashboard", "Streamlit pages over run directories (read-only)")
    add_command(verbs, "serve", ServeConfig, serve, "start the dashboard web server")
