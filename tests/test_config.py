"""trainers.config: YAML values become typed fields, and a bad value names its key."""

from __future__ import annotations

import pytest
import yaml

from trainers.config import ConfigError, TrainConfig


def test_yaml_scientific_notation_and_lists_become_typed_values():
    # PyYAML (YAML 1.1) reads 1e-3 as a string and lists as lists; fields get their declared types
    values = yaml.safe_load(
        "lr: 1e-3\nepochs: 3\nimage_size: [64, 48]\ntta: hflip,scale\ndrop_ages: [57, 58]\n"
    )
    assert values["lr"] == "1e-3"
    cfg = TrainConfig.from_dict(values)
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and cfg.image_size == (64, 48) and cfg.drop_ages == (57, 58)
    assert cfg.tta == ("hflip", "scale")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what a run saves reads back the same


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": "fast"}, "config key 'lr': expected a number, got 'fast'"),
        ({"epochs": 2.5}, "config key 'epochs': expected an integer, got 2.5"),
        ({"batch_size": True}, "config key 'batch_size': expected an integer, got True"),
        ({"image_size": "64x48"}, "config key 'image_size': expected a list of integers"),
        ({"amp": "yes"}, "config key 'amp': expected true or false, got 'yes'"),
        ({"augment": {"hflip": "often"}}, "config key 'augment.hflip': expected a probability"),
        ({"lr": -1.0}, "config key 'lr': must be > 0"),
        ({"tta": ["rotate"]}, "config key 'tta': unknown views ['rotate']"),
        ({"k": 1}, "config key 'k': must be >= 2 folds"),
        ({"learning_rate": 0.1}, "unknown config key(s) ['learning_rate']"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(values)
    assert message in str(caught.value)
