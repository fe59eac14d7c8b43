"""train.optim: every optimizer in the table builds and steps; schedules warm up; bad names fail."""

from __future__ import annotations

import pytest
import torch

from train.optim import OPTIMIZERS, build_lr_scheduler, build_optimizer


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
