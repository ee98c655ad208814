"""``foldtune ui``: the MLflow UI over a search's tracking store, on localhost by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from orchestrator.errors import OrchestratorError
from orchestrator.tracking.store import artifact_root, resolve_tracking_uri, sqlite_path
from orchestrator.tracking.ui_view import MODEL_TRAINING_QUERY, search_links


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
    # A small supervisor in its own process group runs mlflow ui (a server, workers and job consumers, all in
    # that group). On Linux it gets SIGTERM when foldtune dies without a chance to stop it (SIGKILL), and then
    # stops the whole group itself: mlflow ui does not stop its workers on its own in every version.
    return subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, *command], start_new_session=True, preexec_fn=_die_with_parent
    )


_SUPERVISOR = """
import os, signal, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:])
def stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)  # the whole group: mlflow ui and everything it started
    deadline = time.monotonic() + 10
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, stop)
sys.exit(child.wait())
"""


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def stop_ui(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the UI's whole process group: SIGTERM, then SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid):
            break


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# MLflow 3's UI has a global "GenAI | Model training" switch that starts on GenAI (traces, evaluation runs).
# The experiment's mlflow.experimentKind tag (set by foldtune, see tracking.provenance) classifies the
# experiment, but in MLflow 3.17 it does not flip that switch; the workflowType query parameter does
# (checked in headless Chromium, tests/test_ui.py). So every link foldtune prints carries it.


def experiment_url(base: str, experiment_id: str | None = None) -> str:
    """The UI link that opens on the training runs: an experiment's runs table, or the experiment list."""
    page = f"/#/experiments/{experiment_id}" if experiment_id is not None else "/#/experiments"
    return f"{base.rstrip('/')}{page}{MODEL_TRAINING_QUERY}"


def launch_ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> int:
    """Run the MLflow UI until it ends; Ctrl-C or SIGTERM (raised here as KeyboardInterrupt by the CLI)
    stops its whole process group, frees the port, and is raised again for the CLI's exit code."""
    process = start_ui(tracking_uri, port=port, host=host)
    base = f"http://{host}:{port}"
    print(
        f"MLflow UI over {resolve_tracking_uri(tracking_uri)}: open {experiment_url(base)} (Ctrl-C stops it)"
    )
    try:
        for name, link in search_links(resolve_tracking_uri(tracking_uri), base):
            print(f"  search '{name}', its trials by F1 with their parameters and F1 per epoch: {link}")
    except Exception as error:  # the links are a convenience: the UI runs without them
        print(f"warning: no links to the searches' views ({type(error).__name__}: {error})", file=sys.stderr)
    try:
        return process.wait()
    except BaseException:
        stop_ui(process)
        raise
