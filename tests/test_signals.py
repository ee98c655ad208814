"""SIGTERM and Ctrl-C outside the search: every command stops where it is, cleans up and says so, with exit
code 143 (SIGTERM) or 130 (Ctrl-C). ``foldtune ui`` takes its whole MLflow UI process group with it and
frees its port, also when it is SIGKILLed itself. The search's own signals are in tests/test_faults_search.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

FOLDTUNE = [sys.executable, "-m", "orchestrator.cli"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_free(port: int) -> bool:
    """Whether a new server can listen on ``port``, as a restarted UI would: with SO_REUSEADDR, as servers
    set it, so connections the stopped server closed (TIME_WAIT) do not count; a listening socket does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_ui(tmp_path: Path, store_template: Path) -> tuple[subprocess.Popen, int, list[psutil.Process]]:
    """``foldtune ui`` on a fresh store, once it answers; and every process it started."""
    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(store_template, store)
    port = _free_port()
    process = subprocess.Popen(
        [*FOLDTUNE, "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{store}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the UI did not answer within 120 s"
        time.sleep(0.5)
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "foldtune ui started no MLflow UI process"
    return process, port, children


def _all_gone(processes: list[psutil.Process], timeout_s: float = 30) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


def test_sigterm_stops_the_ui_its_workers_and_frees_the_port(tmp_path, store_template):
    process, port, children = _start_ui(tmp_path, store_template)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert not _all_gone(children), "processes of the MLflow UI outlived foldtune ui"
    assert _port_free(port)
    assert process.stderr.read().strip().splitlines()[-1] == "terminated"


def test_a_sigkilled_ui_command_takes_the_mlflow_ui_with_it(tmp_path, store_template):
    """SIGKILL runs no handler: Linux sends the UI its parent-death signal instead, and the UI stops its
    workers; nothing of it is left holding the port."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    process, port, children = _start_ui(tmp_path, store_template)
    process.kill()
    process.wait(timeout=30)
    alive = _all_gone(children, timeout_s=60)
    for leftover in alive:  # do not leave them to the next test
        leftover.kill()
    assert not alive, f"left running: {[p.name() for p in alive]}"
    assert _port_free(port)


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_to_a_command_is_its_exit_code_and_one_line(tmp_path, sig, code, word):
    """The CLI's handler at work on a command that waits (``foldtune ui`` on a missing store would exit at
    once, so a command blocked reading stdin stands in): the signal is raised where it runs."""
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal\n"
        "from orchestrator import cli\n"
        "def slow(args):\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(60)\n"
        "    finally:\n"
        "        open(os.environ['CLEANED'], 'w').write('cleaned up')\n"
        "    return 0\n"
        "parser = cli.build_parser\n"
        "def build():\n"
        "    p = parser()\n"
        "    p._subparsers._group_actions[0].choices['check-data'].set_defaults(func=slow)\n"
        "    return p\n"
        "cli.build_parser = build\n"
        "sys.exit(cli.main(['check-data', '--data', '.']))\n"
    )
    marker = tmp_path / "cleaned"
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CLEANED": str(marker)},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(sig)
    assert process.wait(timeout=60) == code
    assert process.stderr.read().strip().splitlines()[-1] == word
    assert marker.read_text() == "cleaned up"  # the command's finally ran
