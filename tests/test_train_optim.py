"""train.runtime.optim: every optimizer in the table builds and steps; schedules warm up; bad names fail."""

from __future__ import annotations

import pytest
import torch

from train.runtime.optim import OPTIMIZERS, build_lr_scheduler, build_optimizer


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
