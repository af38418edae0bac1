"""DPO / IPO / hinge / robust, SimPO and ORPO losses: hand-worked values and parity with TRL 1.16.

TRL computes these losses inside its trainers, so the oracle runs TRL's own methods
unbound, on a stand-in `self` that carries only the attributes they read:
`DPOTrainer._compute_loss` (its model call returns the per-token log-probs we chose),
`CPOTrainer.get_batch_loss_metrics` (SimPO, cpo_alpha=0) and
`ORPOTrainer.get_batch_loss_metrics`, each with `concatenated_forward` replaced by one
that returns the given log-probs.
"""

import math
import os
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from align.losses import DPO_LOSSES, dpo_loss, log1mexp, orpo_loss, sequence_logps, simpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
TOL = dict(atol=1e-6, rtol=1e-6)


def _sigma(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------
# values worked by hand
# ---------------------------------------------------------------------------
def test_dpo_sigmoid_by_hand():
    t = torch.tensor
    losses, cr, rr = dpo_loss(t([-5.0]), t([-9.0]), t([-7.0]), t([-6.0]), beta=0.1)
    # log-ratios: chosen +2, rejected -3 -> -log sigma(0.1 * 5)
    assert losses.item() == pytest.approx(-math.log(_sigma(0.5)), abs=1e-6)
    assert cr.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.3)


def test_dpo_variants_by_hand():
    t = torch.tensor
    args = (t([2.0]), t([-3.0]), t([0.0]), t([0.0]))
    hinge, _, _ = dpo_loss(*args, beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.5)  # max(0, 1 - 0.5)
    ipo, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo", chosen_lengths=t([2.0]), rejected_lengths=t([3.0]))
    assert ipo.item() == pytest.approx((1.0 + 1.0 - 5.0) ** 2)  # (2/2 - (-3/3) - 1/(2*0.1))^2 = 9
    robust, _, _ = dpo_loss(*args, beta=0.1, loss_type="robust", label_smoothing=0.1)
    expected = (-0.9 * math.log(_sigma(0.5)) + 0.1 * math.log(_sigma(-0.5))) / 0.8
    assert robust.item() == pytest.approx(expected, abs=1e-6)
    conservative, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert conservative.item() == pytest.approx(-0.9 * math.log(_sigma(0.5)) - 0.1 * math.log(_sigma(-0.5)), abs=1e-6)


def test_simpo_and_orpo_by_hand():
    t = torch.tensor
    losses, cr, rr = simpo_loss(t([-0.5]), t([-1.5]), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(-math.log(_sigma(1.5)), abs=1e-6)
    assert (cr.item(), rr.item()) == pytest.approx((-1.0, -3.0))
    c, r = math.log(0.5), math.log(0.2)  # p = 0.5 and 0.2: odds 1 and 0.25
    losses, _, _ = orpo_loss(t([c]), t([r]), t([1.25]), lam=0.1)
    assert losses.item() == pytest.approx(1.25 - 0.1 * math.log(_sigma(math.log(1.0 / 0.25))), abs=1e-6)


def test_log1mexp_is_stable_on_both_branches():
    x = torch.tensor([-1e-7, -0.5, -0.7, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-30]))).all()


def test_sequence_logps_sums_completion_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    sums, counts = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert sums[0].item() == pytest.approx((logp[0, 1, 3] + logp[0, 2, 4]).item(), abs=1e-6)
    assert counts.tolist() == [2, 4]


def test_unknown_variant_and_ipo_without_lengths_fail():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="expected one of"):
        dpo_loss(t, t, t, t, loss_type="sigmod")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(t, t, t, t, loss_type="ipo")
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}


# ---------------------------------------------------------------------------
# parity with TRL 1.16
# ---------------------------------------------------------------------------
def _identity(x):
    return x


ACCEL = SimpleNamespace(device=torch.device("cpu"), gather=_identity, gather_for_metrics=_identity)


def _random_pairs(B=6, T=9, seed=0):
    """Per-token log-probs (2B, T-1) and a completion mask (2B, T) of varied lengths, as TRL sees them."""
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        completion_mask[row, start:end] = 1
    per_token = per_token * completion_mask[:, 1:]
    ref_per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    return per_token, ref_per_token, completion_mask


def _trl_dpo_loss(per_token, ref_per_token, completion_mask, *, loss_types, loss_weights, beta, label_smoothing):
    from trl import DPOTrainer

    B2, T1 = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(B2, T1), mean_logits=torch.zeros(B2, T1),
                              is_top1=torch.zeros(B2, T1, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    fake = SimpleNamespace(
        model=model, accelerator=ACCEL, aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights, beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    ref = ref_per_token.sum(1)
    inputs = {"input_ids": torch.zeros(B2, T1 + 1, dtype=torch.long), "attention_mask": torch.ones(B2, T1 + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[: B2 // 2],
              "ref_rejected_logps": ref[B2 // 2:]}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.2)])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_matches_trl(loss_type, label_smoothing, beta):
    per_token, ref_per_token, mask = _random_pairs(seed=hash((loss_type, beta)) % 1000)
    expected, metrics = _trl_dpo_loss(per_token, ref_per_token, mask, loss_types=[loss_type], loss_weights=[1.0],
                                      beta=beta, label_smoothing=label_smoothing)
    logps, ref, lengths = per_token.sum(1), ref_per_token.sum(1), mask.sum(1).double()
    B = logps.shape[0] // 2
    losses, cr, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing, chosen_lengths=lengths[:B],
                              rejected_lengths=lengths[B:])
    torch.testing.assert_close(losses.mean(), expected, **TOL)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6)
    assert (cr > rr).double().mean().item() == pytest.approx(metrics["rewards/accuracies"][0])
    assert (cr - rr).mean().item() == pytest.approx(metrics["rewards/margins"][0], abs=1e-6)


def test_dpo_with_nll_term_matches_trl_sigmoid_plus_sft_for_equal_lengths():
    """RPO: per-pair NLL token means equal TRL's batch token mean when chosen lengths are equal."""
    B, T = 5, 8
    per_token, ref_per_token, _ = _random_pairs(B=B, T=T, seed=3)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    mask[:B, 3:7] = 1  # chosen: 4 completion tokens each
    mask[B:, 2:8] = 1
    per_token, ref_per_token = per_token * mask[:, 1:], ref_per_token * mask[:, 1:]
    alpha = 0.6
    expected, _ = _trl_dpo_loss(per_token, ref_per_token, mask, loss_types=["sigmoid", "sft"],
                                loss_weights=[1.0, alpha], beta=0.1, label_smoothing=0.0)
    logps, ref = per_token.sum(1), ref_per_token.sum(1)
    losses, _, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1)
    chosen_nll = -logps[:B] / mask[:B, 1:].sum(1)
    torch.testing.assert_close((losses + alpha * chosen_nll).mean(), expected, **TOL)


def _trl_pair_method(trainer_cls, loss_method, fake, chosen, rejected, nll):
    fake.accelerator = ACCEL
    fake.aux_loss_enabled = False
    fake.concatenated_forward = lambda model, batch: (chosen, rejected, torch.zeros(3), torch.zeros(3), nll)
    setattr(fake, loss_method, partial(getattr(trainer_cls, loss_method), fake))
    loss, metrics = trainer_cls.get_batch_loss_metrics(fake, None, None)
    return loss, metrics


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.3, 0.1)])
def test_simpo_matches_trl_cpo(beta, gamma, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(int(beta * 10))
    chosen, rejected = -torch.rand(8, generator=g, dtype=torch.float64) * 3, -torch.rand(8, generator=g,
                                                                                           dtype=torch.float64) * 3
    fake = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo",
                           label_smoothing=label_smoothing, cpo_alpha=0.0)
    expected, metrics = _trl_pair_method(CPOTrainer, "cpo_loss", fake, chosen, rejected, torch.tensor(0.0))
    losses, cr, rr = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses.mean(), expected.to(losses.dtype), **TOL)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_matches_trl(lam):
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(int(lam * 10))
    chosen = -torch.rand(8, generator=g, dtype=torch.float64) * 3 - 1e-3
    rejected = -torch.rand(8, generator=g, dtype=torch.float64) * 3 - 1e-3
    nll = torch.tensor(1.7, dtype=torch.float64)  # TRL: one token mean over prompt + chosen of the batch
    fake = SimpleNamespace(beta=lam)
    expected, metrics = _trl_pair_method(ORPOTrainer, "odds_ratio_loss", fake, chosen, rejected, nll)
    losses, cr, _ = orpo_loss(chosen, rejected, nll.expand(8), lam=lam)
    torch.testing.assert_close(losses.mean(), expected.to(losses.dtype), **TOL)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)


def test_orpo_gradient_prefers_chosen():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, torch.zeros(1), lam=1.0)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-math.log(2))
