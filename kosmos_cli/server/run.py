"""Run `kosmos serve`: check where it listens, build the service and the app, and serve until SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kosmos_cli.config import Settings
from kosmos_cli.errors import UsageError

API_KEY_ENV = "KOSMOS_API_KEY"
SERVER_PACKAGES = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")
SHUTDOWN_SECONDS = 10  # how long open connections get to finish once SIGTERM arrives


@dataclass(frozen=True)
class Listen:
    """Where and how the server listens."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    log_level: str = "info"


def missing_packages() -> None:
    """Raise UsageError, naming the extra to install, if a package the server needs is missing."""
    import importlib.util

    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"kosmos serve needs {', '.join(missing)}", hint="pip install 'kosmos-transcribe[serve]'"
        )


def default_jobs_folder() -> Path:
    """Where jobs are kept: $XDG_STATE_HOME/kosmos/jobs, else ~/.local/state/kosmos/jobs."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "kosmos" / "jobs"


def jobs_folder(folder: Path | None) -> Path:
    """Make the folder jobs are kept in (default: `default_jobs_folder`) and return it; raises
    UsageError if it cannot be made or written."""
    folder = folder or default_jobs_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot keep jobs in `{folder}`: {error.strerror or error}", hint="choose another --jobs-dir"
        ) from None
    return folder


def check_listen(listen: Listen) -> None:
    """Refuse an address other than loopback without a key, and an empty key."""
    if listen.api_key is not None and not listen.api_key.strip():
        raise UsageError("--api-key is empty", hint=f"give a key, or unset {API_KEY_ENV}")
    if listen.api_key is None and not is_loopback(listen.host):
        raise UsageError(
            f"--host {listen.host} lets other machines in, and there is no key",
            hint=f"add --api-key KEY (or set {API_KEY_ENV}), or keep the default --host 127.0.0.1",
        )
    if not 0 <= listen.port <= 65535:
        raise UsageError(f"--port {listen.port} is not a port (0 to 65535)")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(settings: Settings, listen: Listen, folder: Path, limits: Any, options: Any) -> None:
    """Serve until SIGTERM or Ctrl-C: stop taking requests, save what runs (jobs resume at the next
    start), and return.

    The model loads while the server already answers `/health`; if it cannot load, the server stops
    and its error is raised here (ModelLoadError).
    """
    import uvicorn

    from kosmos_cli.model.loading import load_runner
    from kosmos_cli.server.app import create_app
    from kosmos_cli.server.metrics import Metrics
    from kosmos_cli.server.service import Service

    def load_or_stop(settings: Settings) -> Any:
        try:
            return load_runner(settings)
        except BaseException:
            server.should_exit = True
            raise

    metrics = Metrics()
    service = Service(settings, folder, limits, metrics)
    app = create_app(service, metrics, options, load_or_stop)
    config = uvicorn.Config(
        app,
        host=listen.host,
        port=listen.port,
        log_level=listen.log_level,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        server_header=False,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            """Tell the service first: requests waiting on jobs answer at once, not at the deadline."""
            service.stopping = True
            super().handle_exit(sig, frame)

    server = Server(config)
    server.run()
    if service.failure is not None:
        raise service.failure
