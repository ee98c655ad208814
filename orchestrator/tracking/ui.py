"""``foldtune ui``: the MLflow UI over a search's tracking store, on localhost by default."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.errors import OrchestratorError
from orchestrator.tracking.store import artifact_root, resolve_tracking_uri, sqlite_path


def start_ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> subprocess.Popen:
    """Start ``mlflow ui`` over the tracking store (with its artifact root) and return the process."""
    uri = resolve_tracking_uri(tracking_uri)
    store = sqlite_path(uri)
    if store is not None and not store.exists():
        raise OrchestratorError(
            f"no MLflow store at {store}: run a search first, or point MLFLOW_TRACKING_URI at your store"
        )
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    # one worker: a personal UI starts in seconds instead of importing MLflow in four processes
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: the MLflow UI has no login; anyone who can reach {host}:{port} can read and edit runs",
            file=sys.stderr,
        )
    return subprocess.Popen(command)


def launch_ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> int:
    """Run the MLflow UI until Ctrl-C; returns its exit code (0 after Ctrl-C)."""
    process = start_ui(tracking_uri, port=port, host=host)
    print(f"MLflow UI on http://{host}:{port} over {resolve_tracking_uri(tracking_uri)} (Ctrl-C stops it)")
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=30)
        return 0
