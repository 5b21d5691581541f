"""The reference recipe: LR scaling, warmup + multistep schedule, parameter groups."""

import math

import pytest
import torch
from torch import nn

from ssd300.optim import WarmupMultiStepSchedule, build_optimizer, parameter_groups, scaled_learning_rate


def test_scaled_learning_rate_follows_reference_rule():
    assert scaled_learning_rate(2.6e-3, 1, 32) == pytest.approx(2.6e-3)
    assert scaled_learning_rate(2.6e-3, 8, 64) == pytest.approx(2.6e-3 * 16)
    assert scaled_learning_rate(2.6e-3, 1, 8) == pytest.approx(6.5e-4)


@pytest.mark.parametrize("epoch,iteration,expected", [
    (0, 0, 0.0),                 # warmup starts at 0 (reference: base * iteration / warmup)
    (0, 75, 0.25 * 0.1),
    (0, 150, 0.5 * 0.1),
    (0, 299, 299 / 300 * 0.1),
    (0, 300, 0.1),               # warmup done
    (42, 10_000, 0.1),
    (43, 10_000, 0.01),          # first milestone reached at epoch 43
    (53, 10_000, 0.01),
    (54, 10_000, 0.001),
    (64, 10_000, 0.001),
])
def test_schedule_pins_learning_rate(epoch, iteration, expected):
    schedule = WarmupMultiStepSchedule(base_lr=0.1, warmup_iterations=300, milestones=[43, 54])
    assert schedule.learning_rate(epoch, iteration) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_no_warmup_means_full_rate_from_the_start():
    schedule = WarmupMultiStepSchedule(base_lr=0.02, warmup_iterations=0, milestones=[1])
    assert schedule.learning_rate(0, 0) == pytest.approx(0.02)
    assert schedule.learning_rate(1, 5) == pytest.approx(0.002)


def test_apply_sets_every_group_and_state_roundtrips():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    optimizer = build_optimizer(model, lr=1.0)
    schedule = WarmupMultiStepSchedule(base_lr=0.4, warmup_iterations=4, milestones=[2])
    lr = schedule.apply(optimizer, epoch=2, iteration=3)
    assert lr == pytest.approx(0.4 * 0.1 * 3 / 4)
    assert all(g["lr"] == pytest.approx(lr) for g in optimizer.param_groups)
    state = schedule.state_dict()
    assert all(isinstance(v, (int, float, list, str)) for v in state.values())  # weights_only-loadable
    other = WarmupMultiStepSchedule(base_lr=0.4, warmup_iterations=4, milestones=[2])
    other.load_state_dict(state)
    assert (other.last_epoch, other.last_iteration) == (2, 3)


def test_parameter_groups_decay_only_multi_dimensional_weights():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 5))
    model[0].bias.requires_grad_(True)
    groups = parameter_groups(model, weight_decay=5e-4)
    decay_ids = {id(p) for p in groups[0]["params"]}
    no_decay_ids = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert decay_ids == {id(model[0].weight), id(model[4].weight)}
    assert no_decay_ids == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[4].bias)}
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == total


def test_frozen_parameters_are_left_out():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    groups = parameter_groups(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [1, 0]


def test_optimizer_is_reference_sgd():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)
    # one SGD step with decay on the weight only: w <- w - lr * (grad + wd * w)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()
    assert torch.allclose(model.weight, w0 * (1 - 0.01 * 5e-4))
    assert torch.equal(model.bias, b0)
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.01)


@pytest.mark.parametrize("iteration,expected", [
    (0, 0.0),                                        # warmup multiplies the cosine as it does the steps
    (5, 0.5 * 0.2 * 0.5 * (1 + math.cos(math.pi * 5 / 100))),
    (10, 0.2 * 0.5 * (1 + math.cos(math.pi * 10 / 100))),
    (50, 0.1),                                       # half way: half the rate
    (100, 0.0),
    (250, 0.0),                                      # past the end: stays at 0
])
def test_cosine_schedule_falls_to_zero_over_the_run(iteration, expected):
    schedule = WarmupMultiStepSchedule(base_lr=0.2, warmup_iterations=10, milestones=[1], kind="cosine",
                                       total_iterations=100)
    # the epoch plays no part (milestones are unused by the cosine)
    assert schedule.learning_rate(epoch=3, iteration=iteration) == pytest.approx(expected, abs=1e-15)


def test_cosine_state_records_the_recipe_and_bad_kinds_are_refused():
    schedule = WarmupMultiStepSchedule(base_lr=0.2, warmup_iterations=0, milestones=[], kind="cosine",
                                       total_iterations=40)
    schedule.apply(build_optimizer(nn.Linear(2, 1), lr=1.0), epoch=1, iteration=20)
    state = schedule.state_dict()
    assert (state["kind"], state["total_iterations"], state["last_iteration"]) == ("cosine", 40, 20)
    # resuming restores the position; the recipe comes from the resumed run's config, as for multistep
    other = WarmupMultiStepSchedule(base_lr=0.2, warmup_iterations=0, milestones=[], kind="cosine",
                                    total_iterations=40)
    other.load_state_dict(state)
    assert (other.last_epoch, other.last_iteration) == (1, 20)
    with pytest.raises(ValueError, match="schedule must be one of multistep, cosine"):
        WarmupMultiStepSchedule(base_lr=0.1, warmup_iterations=0, milestones=[], kind="linear")
    with pytest.raises(ValueError, match="total_iterations >= 1"):
        WarmupMultiStepSchedule(base_lr=0.1, warmup_iterations=0, milestones=[], kind="cosine")


def test_adamw_uses_momentum_as_first_beta_and_decays_weights_only():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.8, weight_decay=0.1, kind="adamw")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.999) for g in optimizer.param_groups)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()  # zero gradients: only the decoupled decay moves anything, w <- w * (1 - lr * wd)
    assert torch.allclose(model.weight, w0 * (1 - 0.01 * 0.1))
    assert torch.equal(model.bias, b0)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        build_optimizer(model, lr=0.01, kind="lamb")
