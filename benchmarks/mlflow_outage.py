"""``python -m benchmarks.mlflow_outage``: does a search go on at full speed while its MLflow server is down?

Three searches of the same stand-in trials (no training: each epoch sleeps, so the wall time is the
orchestration's), each against its own real ``mlflow server`` on 127.0.0.1: the server ``up`` all along,
``killed`` (SIGKILL: connections refused) after the first trial's first epoch reached it, and ``stalled``
(SIGSTOP: connections accepted, never answered; the worst case, a hung server) at the same moment. The
killed and stalled arms get their server back (SIGCONT / a restart) after the search, then
``foldtune sync-mlflow`` sends what waited; the report says how many records that was and whether every
trial's child run and epochs arrived.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

EPOCH_S = 0.5  # one stand-in epoch
TRIALS, EPOCHS = 8, 4


def standin_trial(epoch_s: float):
    """Reports val_f1 = lr every ``epoch_s`` seconds for the planned epochs; a closure so Ray ships it by
    value (this module is not importable in the trial processes)."""

    def standin(params, context) -> None:
        import time
        from pathlib import Path

        from ray import tune

        run_dir = Path(context.trials_dir) / tune.get_context().get_trial_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        planned = context.space.config_for(params).epochs
        lr = float(params["lr"])
        for epoch in range(1, planned + 1):
            time.sleep(epoch_s)
            tune.report(
                {"val_f1": lr, "epoch": epoch, "epochs_planned": planned, "best_f1": lr, "best_epoch": epoch}
            )
        result = {"status": "completed", "best_f1": lr, "best_epoch": planned, "epochs_trained": planned}
        (run_dir / "result.json").write_text(json.dumps(result))

    return standin


class Server:
    """A real ``mlflow server`` on 127.0.0.1 in its own process group (stopping it stops its workers too),
    over a SQLite file and an artifact folder in ``folder``; ``start`` again serves the same store on the
    same port. Also the slow outage test's server (tests/test_faults_search.py)."""

    def __init__(self, folder: Path):
        from orchestrator.tracking.store import store_answers

        self.folder, self._answers = folder, store_answers
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}", "--workers", "1"]
        command += ["--artifacts-destination", str(self.folder / "artifacts")]
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 (the server keeps it)
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._answers(self.uri, timeout_s=1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {self.folder / 'server.log'}")
            time.sleep(0.2)

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, number)

    def stop(self) -> None:
        if self.process is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None


def first_epoch_logged(uri: str) -> bool:
    from orchestrator.tracking import SearchTracking

    with contextlib.suppress(Exception):
        client = SearchTracking(uri, "outage").client
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return any("val_f1" in run.data.metrics for run in runs)
    return False


def run_arm(arm: str, work: Path, data_root: Path) -> dict[str, Any]:
    import ray

    from orchestrator.cli import main as foldtune
    from orchestrator.search import run_search
    from orchestrator.tracking import SearchTracking

    folder = work / arm
    (folder / "server").mkdir(parents=True)
    space = folder / "outage.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "outage",
                "trials": TRIALS,
                "fixed": {"epochs": EPOCHS, "k": 2, "image_size": [32, 24], "batch_size": 16},
                "search": {"lr": {"loguniform": [1e-3, 1.0]}},
                "resources": {"cpu": 1, "gpu": 0},
                "max_concurrent": 2,
                "scheduler": "none",
                "sampler": {"seed": 3},
                "max_failures": 0,
            }
        )
    )
    server = Server(folder / "server")
    server.start()
    outage_at: list[float] = []

    def outage() -> None:
        while not first_epoch_logged(server.uri):
            time.sleep(0.1)
        outage_at.append(time.monotonic())
        server.signal(signal.SIGKILL if arm == "killed" else signal.SIGSTOP)

    if arm != "up":
        threading.Thread(target=outage, daemon=True).start()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        summary = run_search(
            data_root,
            space,
            storage=folder / "runs",
            tracking_uri=server.uri,
            cache_dir=folder / "cache",
            progress=False,
            trial_fn=standin_trial(EPOCH_S),
        )
        wall = time.monotonic() - started
    finally:
        ray.shutdown()
    outbox = folder / "runs" / "outage" / "mlflow_outbox.jsonl"
    waiting = len(outbox.read_text().splitlines()) if outbox.exists() else 0
    row = {"arm": arm, "search_s": round(wall, 1), "finished": summary.finished, "records_waiting": waiting}
    if outage_at:
        row["after_outage_s"] = round(started + wall - outage_at[0], 1)
    if arm == "killed":
        server.process.wait(timeout=30)
        server.start()
    elif arm == "stalled":
        server.signal(signal.SIGCONT)
    if waiting:
        row["sync_mlflow_exit"] = foldtune(["sync-mlflow", "outage", "--storage", str(folder / "runs")])
    client = SearchTracking(server.uri, "outage").client  # (MLflow is imported in orchestrator.tracking only)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    row["child_runs_finished"] = sum(r.info.status == "FINISHED" for r in children)
    row["epochs_in_mlflow"] = sum(len(client.get_metric_history(r.info.run_id, "val_f1")) for r in children)
    row["runs_running"] = sum(r.info.status == "RUNNING" for r in runs)
    server.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="up,killed,stalled")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    from orchestrator.demo.data import write_demo_data

    with tempfile.TemporaryDirectory(prefix="foldtune-outage-") as tmp:
        work = Path(tmp)
        data_root = work / "data"
        write_demo_data(data_root, persons=12, eval_persons=1, image_size=(24, 32))
        rows = [run_arm(arm, work, data_root) for arm in args.arms.split(",")]
    expected = {"trials": TRIALS, "epochs": TRIALS * EPOCHS, "epoch_s": EPOCH_S}
    print(json.dumps({"plan": expected, "arms": rows}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"plan": expected, "arms": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
