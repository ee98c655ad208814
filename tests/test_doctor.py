"""``foldtune doctor`` on this CPU machine, and with fakes of a GPU node: a fake ``nvidia-smi`` (driver 550)
beside this machine's CUDA 13 torch, and a Ray cluster that declares 8 GPUs."""

from __future__ import annotations

import pytest
import ray
import yaml

import trainers.device as device_module
from orchestrator.cli import main
from orchestrator.doctor import run_doctor, which_space


def tiny_gpu_space(path, **fixed) -> str:
    raw = {
        "name": "tinygpu",
        "trials": 2,
        "fixed": {
            "epochs": 1,
            "k": 2,
            "image_size": [32, 24],
            "batch_size": 16,
            "pretrained": False,
            **fixed,
        },
        "search": {"lr": {"loguniform": [1e-4, 1e-1]}},
        "resources": {"cpu": 1, "gpu": 0.5},
        "max_concurrent": "auto",
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def doctor(tmp_path, **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_doctor(
        storage=tmp_path / "runs", tracking_uri=str(tmp_path / "mlruns"), out=lines.append, **kwargs
    )
    return code, lines


def test_doctor_on_this_machine_exits_0_and_picks_the_cpu_space(tmp_path, capsys):
    code = main(["doctor", "--storage", str(tmp_path / "runs"), "--tracking-uri", str(tmp_path / "mlruns")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SPACE=auto: no GPU: cpu.yaml" in out and "doctor: nothing blocks a run" in out
    lines = out.strip().splitlines()
    topics = [line.split()[1] for line in lines[:-1]]
    assert topics[:3] == ["torch", "ray", "space"] and {"shm", "disk", "cache", "mlflow", "weights"} <= set(
        topics
    )
    assert all(line.split()[0] in ("ok", "warn") for line in lines[:-1]), out
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()  # it only reads


@pytest.fixture
def eight_gpu_ray():
    ray.init(num_cpus=16, num_gpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_doctor_on_a_gpu_node_with_a_cuda_13_torch_and_driver_550_names_the_fix(
    tmp_path, fake_nvidia_smi, cuda13_torch, eight_gpu_ray
):
    fake_nvidia_smi(driver="550.54.15", gpus=8)
    code, lines = doctor(tmp_path, space=tiny_gpu_space(tmp_path / "gpu.yaml"))
    text = "\n".join(lines)
    assert code == 1, text
    torch_line = next(line for line in lines if line.split()[1] == "torch")
    assert torch_line.startswith("FAIL") and "550.54.15" in torch_line
    assert "make clean && make .venv TORCH=cu126" in torch_line
    assert "SPACE=auto: 8 GPUs: default.yaml" in text
    assert "gpu.yaml: max_concurrent auto: 16 trials at once at 0.5 GPU + 1 CPU each" in text
    assert lines[-1] == "doctor: 1 problem(s) would stop a run (the FAIL lines above)"


def test_doctor_fails_when_dev_shm_cannot_hold_the_loaders(tmp_path, monkeypatch, eight_gpu_ray):
    monkeypatch.setattr(device_module, "shared_memory_free", lambda path="/dev/shm": 64 * 2**20)
    space = tiny_gpu_space(tmp_path / "gpu.yaml", num_workers=4, batch_size=256, image_size=[224, 168])
    code, lines = doctor(tmp_path, space=space)
    shm = next(line for line in lines if line.split()[1] == "shm")
    assert code == 1 and shm.startswith("FAIL") and "/dev/shm has 0.1 GiB free" in shm
    assert "16 trial(s) × 4 loader worker(s) of batch 256 at 224x168" in shm and "--shm-size" in shm


def test_doctor_fails_on_an_mlflow_server_that_does_not_answer(tmp_path):
    lines: list[str] = []
    code = run_doctor(storage=tmp_path, tracking_uri="http://127.0.0.1:9", out=lines.append)
    mlflow = next(line for line in lines if line.split()[1] == "mlflow")
    assert code == 1 and mlflow.startswith("FAIL") and "http://127.0.0.1:9 does not answer" in mlflow


def test_which_space_follows_the_gpus_the_driver_lists(fake_nvidia_smi, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert which_space().name == "cpu.yaml"
    fake_nvidia_smi(gpus=8)
    assert which_space().name == "default.yaml"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none of them visible here
    assert which_space().name == "cpu.yaml"
