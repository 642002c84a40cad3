"""Optimiser conventions: backbone at lr with decay, head (GeM p) at lr x factor without decay; schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hetretrieval.errors import ConfigError
from hetretrieval.models.pooling.heads import GeM
from hetretrieval.training.optimization import OptimizerOptions, build_optimization, parameter_groups


def test_head_learns_faster_without_weight_decay():
    backbone, head = nn.Linear(3, 3), GeM(p=3.0)
    groups = parameter_groups(backbone, head, OptimizerOptions(lr=1e-6, head_lr_factor=10, weight_decay=1e-4))
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 1e-6 and by_name["backbone"]["weight_decay"] == 1e-4
    assert by_name["head"]["lr"] == pytest.approx(1e-5) and by_name["head"]["weight_decay"] == 0.0
    assert by_name["head"]["params"] == [head.p]


def test_frozen_parameters_are_left_out():
    groups = parameter_groups(nn.Linear(2, 2), GeM(learn_p=False), OptimizerOptions())
    assert [g["name"] for g in groups] == ["backbone"]
    with pytest.raises(ConfigError):
        parameter_groups(nn.Identity(), GeM(learn_p=False), OptimizerOptions())


@pytest.mark.parametrize("schedule, expected", [("exponential", 0.5 ** 2), ("cosine", (1 + math.cos(math.pi / 2)) / 2),
                                                ("constant", 1.0)])
def test_schedules_decay_per_epoch(schedule, expected):
    optimizer, scheduler = build_optimization(nn.Linear(2, 2), GeM(), OptimizerOptions(
        name="adamw", lr=1.0, schedule=schedule, gamma=0.5), max_epochs=4)
    assert isinstance(optimizer, torch.optim.AdamW)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(10 * expected)


@pytest.mark.parametrize("bad", [{"name": "sgd"}, {"schedule": "step"}, {"lr": 0.0}, {"gamma": 1.5}])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        OptimizerOptions(**bad)
