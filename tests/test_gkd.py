"""GKD's generalised Jensen-Shannon divergence (align.losses.generalized_jsd_loss): TRL parity and its limits."""

from __future__ import annotations

import pytest
import torch

from align.losses import generalized_jsd_loss


def _random(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[1] = -100  # a row with no trained token
    return student, teacher, labels


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_trl(beta, temperature, reduction):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = _random()
    ours = generalized_jsd_loss(student.float(), teacher.float(), labels, beta=beta, temperature=temperature,
                                reduction=reduction)
    theirs = GKDTrainer.generalized_jsd_loss(student.float(), teacher.float(), labels, beta=beta,
                                             temperature=temperature, reduction=reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # per token: TRL's "none" gives the (N, V) elements of the trained tokens; ours sums them per token
    per_token = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature, reduction="none")
    elements = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature,
                                               reduction="none")
    torch.testing.assert_close(per_token[labels != -100], elements.sum(-1), atol=1e-6, rtol=1e-6)
    assert (per_token[labels == -100] == 0).all()


def test_the_ends_are_forward_and_reverse_kl_and_equal_distributions_give_zero():
    student, teacher, _ = _random(1)
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward = (t.exp() * (t - s)).sum(-1).mean()
    reverse = (s.exp() * (s - t)).sum(-1).mean()
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=0.0).double(), forward.double())
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=1.0).double(), reverse.double())
    for beta in (0.0, 0.3, 1.0):
        assert generalized_jsd_loss(teacher, teacher, beta=beta).abs() < 1e-6
    # the JSD is bounded by its KLs' mixture: 0 < JSD_beta < min(forward, reverse) for a beta in between
    mid = generalized_jsd_loss(student, teacher, beta=0.5)
    assert 0 < mid < min(forward, reverse)


def test_only_the_student_gets_a_gradient_through_a_detached_teacher():
    student, teacher, labels = _random(2)
    student = student.float().requires_grad_()
    generalized_jsd_loss(student, teacher.float(), labels, beta=0.5).backward()
    assert student.grad[labels == -100].abs().max() == 0  # untrained positions get no gradient
    assert student.grad[labels != -100].abs().max() > 0


def test_unknown_reduction_is_refused():
    student, teacher, labels = _random()
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        generalized_jsd_loss(student, teacher, labels, reduction="avg")
