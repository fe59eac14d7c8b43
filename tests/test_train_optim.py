"""train.runtime.optim: every optimizer in the table builds and steps; schedules warm up; bad names fail."""

from __future__ import annotations

import pytest
import torch

from train.runtime.optim import (
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    eval_weights,
    is_schedule_free,
    lora_plus_groups,
)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_steps(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    lr = 1.0 if name == "prodigy" else 1e-2
    optimizer = build_optimizer(name, [{"params": [weight], "lr": lr}], lr=lr, weight_decay=0.0,
                                betas=(0.9, 0.999), eps=1e-8)
    before = weight.detach().clone()
    for _ in range(2):
        weight.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, weight.detach())


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'.*adamw"):
        build_optimizer("sgd", [], lr=1e-3, weight_decay=0, betas=(0.9, 0.999), eps=1e-8)


def test_warmup_then_cosine():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler("cosine", optimizer, warmup_steps=2, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert rates[3] > rates[-1] > 0


def test_fused_adamw_matches_the_foreach_update():
    """speed.fused_optimizer: the one-kernel AdamW takes the same steps as PyTorch's default."""
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    runs = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = build_optimizer("adamw", [{"params": params, "lr": 1e-2}], lr=1e-2, weight_decay=1e-2,
                                    betas=(0.9, 0.999), eps=1e-8, fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for step in range(5):
            (params[0].sin().sum() * (step + 1) + params[1].pow(2).sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        runs.append(params)
    for plain, fused in zip(*runs, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)


def test_schedule_free_evaluates_its_average_and_restores_the_training_point():
    """eval_weights: inside, schedule-free AdamW's x (not the training point y); after, y bit for bit;
    other optimizers are left alone."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    optimizer = build_optimizer("adamw_schedulefree", [{"params": [weight], "lr": 1e-2}], lr=1e-2,
                                weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(3):
        weight.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert is_schedule_free(optimizer)
    training_point = weight.detach().clone()
    with eval_weights(optimizer, [weight]):
        assert not torch.equal(weight, training_point)
        evaluated = weight.detach().clone()
    assert torch.equal(weight, training_point)
    optimizer.eval()  # the library's own switch gives the same x
    torch.testing.assert_close(weight.detach(), evaluated)
    plain = torch.optim.AdamW([weight])
    with eval_weights(plain, [weight]):
        assert not is_schedule_free(plain)


def test_lora_plus_puts_b_matrices_in_a_faster_group():
    a, b, other = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    named = [("x.lora_A.default.weight", a), ("x.lora_B.default.weight", b), ("y.magnitude", other)]
    assert lora_plus_groups(named, 1e-4, 1.0) == [{"params": [a, b, other], "lr": 1e-4}]
    slow, fast = lora_plus_groups(named, 1e-4, 16.0)
    assert slow["params"] == [a, other] and slow["lr"] == 1e-4
    assert fast["params"] == [b] and fast["lr"] == pytest.approx(1.6e-3)
