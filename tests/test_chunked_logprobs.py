"""The chunked head (`align.logprobs`) equals the full-logits computation: values and gradients."""

import pytest
import torch

from align import logprobs
from align.logprobs import OutputHead
from align.losses import entropy_from_logits, token_logprobs


def _plain(hidden, weight, bias, targets, *, temperature=1.0, softcap=None, scale=1.0):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    return token_logprobs(logits, targets), entropy_from_logits(logits)


@pytest.mark.parametrize("chunk", [3, 7, 1000])  # several chunks with a ragged last one; one chunk (p kept)
@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7}, {"softcap": 2.0, "scale": 0.5}])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_full_logits(chunk, settings, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 10, 8, generator=g, requires_grad=True)
    weight = torch.randn(29, 8, generator=g, requires_grad=True)
    b = torch.randn(29, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 29, (2, 10), generator=g)
    targets[0, :3] = -100  # masked positions: 0, no gradient
    w_lp, w_ent = torch.randn(2, 10, generator=g), torch.randn(2, 10, generator=g)

    def grads(logps, entropy):
        inputs = [hidden, weight] + ([b] if bias else [])
        return torch.autograd.grad((logps * w_lp).sum() + (entropy * w_ent).sum(), inputs)

    want_lp, want_ent = _plain(hidden, weight, b, targets, **settings)
    head = OutputHead(weight=weight, bias=b, softcap=settings.get("softcap"), scale=settings.get("scale", 1.0),
                      chunk_tokens=chunk)
    got_lp, got_ent = head.token_logprobs(hidden, targets, temperature=settings.get("temperature", 1.0),
                                          with_entropy=True)
    torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_ent, want_ent, atol=1e-5, rtol=1e-5)
    assert (got_lp[0, :3] == 0).all()
    for got, want in zip(grads(got_lp, got_ent), grads(want_lp, want_ent), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_under_bf16_autocast_the_backward_recomputes_the_logits_the_forward_computed(monkeypatch):
    """Several chunks (recomputed in the backward) give the gradients of one chunk (the forward's p kept):
    the backward's recompute runs the head in the forward's bf16, casting the weight once, not per chunk."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(23, 8, generator=g, requires_grad=True)
    weight = torch.randn(31, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 31, (23,), generator=g)
    w_lp = torch.randn(23, generator=g)  # unequal weights: the backward recomputes

    def grads(chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = OutputHead(weight=weight, chunk_tokens=chunk).token_logprobs(hidden, targets)
        return logps, torch.autograd.grad((logps * w_lp).sum(), [hidden, weight])

    kept_lp, kept = grads(100)
    casts = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: casts.append(self is weight) or real_to(self, *a, **k))
    chunked_lp, chunked = grads(5)
    torch.testing.assert_close(chunked_lp, kept_lp, atol=0, rtol=0)  # the forward: bf16 logits, fp32 softmax
    for got, want in zip(chunked, kept, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # a float32 recompute (the weight not cast) differs by bf16's rounding of the logits: 1.4e-2 / 8.3e-3 relative
    # on these gradients (checked by hand), so the checks above catch it; the count below catches a cast per chunk
    # made through Tensor.to (autocast's own casts per chunk, the old code, happen below Python: not counted here)
    assert sum(casts) == 1, casts


@pytest.mark.parametrize("chunk", [4, 100])
def test_log_probs_alone_give_the_same_gradient_and_a_frozen_head_gets_none(chunk):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(13, 6, generator=g, requires_grad=True)
    weight = torch.randn(17, 6, generator=g)  # frozen (a LoRA run's lm_head)
    targets = torch.randint(0, 17, (13,), generator=g)
    want = torch.autograd.grad(_plain(hidden, weight, None, targets)[0].sum(), hidden)[0]
    got_lp = OutputHead(weight=weight, chunk_tokens=chunk).token_logprobs(hidden, targets)
    torch.testing.assert_close(torch.autograd.grad(got_lp.sum(), hidden)[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 100])
@pytest.mark.parametrize("weights", ["uniform", "per_token"])
def test_gradient_formed_in_the_forward_for_a_summed_nll(chunk, weights, monkeypatch):
    """`uniform=True` (SFT): the forward forms the gradient of the summed log-probs and the backward scales
    it; log-probs weighed unequally (the hint was wrong) fall back to the recompute. Both equal the plain path."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 9, 6, generator=g, requires_grad=True)
    weight = torch.randn(23, 6, generator=g, requires_grad=True)
    bias = torch.randn(23, generator=g, requires_grad=True)
    targets = torch.randint(0, 23, (3, 9), generator=g)
    targets[1, 4:] = -100
    w = torch.full((3, 9), -0.37) if weights == "uniform" else torch.randn(3, 9, generator=g)
    head = OutputHead(weight=weight, bias=bias, softcap=5.0, chunk_tokens=chunk)
    loss = (head.token_logprobs(hidden, targets, temperature=0.8, uniform=True) * w).sum()
    recomputed = []
    real_linear = logprobs.F.linear
    monkeypatch.setattr(logprobs.F, "linear", lambda *a: recomputed.append(1) or real_linear(*a))
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    monkeypatch.undo()
    assert bool(recomputed) == (weights == "per_token")  # no head matmul in the backward when uniform
    want = torch.autograd.grad((_plain(hidden, weight, bias, targets, temperature=0.8, softcap=5.0)[0] * w).sum(),
                               (hidden, weight, bias))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# which path a model gets
# ---------------------------------------------------------------------------
@pytest.fixture
def tiny_lm():
    from align import builtin, models
    from align.recipe import ModelConfig

    tokenizer = builtin.load_tokenizer()
    return models.load_model(ModelConfig(), tokenizer, seed=0), tokenizer


def test_the_built_in_model_gets_the_chunked_head_and_the_key_chooses_the_path(tiny_lm, monkeypatch):
    """auto (the default): a forward whose logits fit in one chunk (2^24 entries) gets the model's own logits;
    a larger one, or chunked=true, the hidden states; false: always the logits."""
    model, _ = tiny_lm
    head = logprobs.output_head(model)
    assert not head.plain and head.weight is model.lm_head.weight and head.softcap is None
    V, H = model.config.vocab_size, model.config.hidden_size
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 16 * V)  # one chunk: 16 positions' logits
    small, large = torch.ones(2, 8, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        for chunked, ids, width in (("auto", small, V), ("auto", large, H), (True, small, H), (False, large, V)):
            logprobs.configure(model, chunked=chunked)
            out, head = logprobs.forward_hidden(model, input_ids=ids)
            assert out.shape[-1] == width and head.plain == (width == V), (chunked, ids.shape)


def test_a_head_the_model_does_not_apply_falls_back_with_a_warning(tiny_lm):
    """Llama ignores final_logit_softcapping; set on its config, the check on a 2-token input catches the
    mismatch (the chunked head would soft-cap) and the plain path runs."""
    model, _ = tiny_lm
    model.config.final_logit_softcapping = 2.0
    with pytest.warns(UserWarning, match="not its output layer applied"):
        assert logprobs.output_head(model).plain
    hidden, head = logprobs.forward_hidden(model, input_ids=torch.tensor([[1, 5, 6]]))
    assert head.plain and hidden.shape[-1] == model.config.vocab_size  # the model's logits


def test_lora_on_the_head_and_zero3_partitioned_heads_fall_back_with_a_warning(tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.warns(UserWarning, match="not a plain Linear"):
        assert logprobs.output_head(lora).plain
    from align import builtin, models
    from align.recipe import ModelConfig

    fresh = models.load_model(ModelConfig(), builtin.load_tokenizer(), seed=0)
    fresh.lm_head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.warns(UserWarning, match="ZeRO-3"):
        assert logprobs.output_head(fresh).plain


def test_lora_elsewhere_keeps_the_chunked_head(tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not logprobs.output_head(lora).plain


@pytest.mark.parametrize("chunk", [4, 100])
def test_a_frozen_head_forms_every_positions_gradient_in_the_forward(chunk, monkeypatch):
    """LoRA leaves lm_head frozen: d/dh_t is local to position t for any loss (here unequal weights on log-probs
    and entropies, a temperature and a soft-cap), so the backward runs no head matmul and equals the plain path."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 7, 5, generator=g, requires_grad=True)
    weight = torch.randn(19, 5, generator=g)
    targets = torch.randint(0, 19, (2, 7), generator=g)
    targets[0, 5:] = -100
    w_lp, w_ent = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    logps, entropy = OutputHead(weight=weight, softcap=3.0, chunk_tokens=chunk).token_logprobs(
        hidden, targets, temperature=0.6, with_entropy=True)
    recomputed = []
    real_linear = logprobs.F.linear
    monkeypatch.setattr(logprobs.F, "linear", lambda *a: recomputed.append(1) or real_linear(*a))
    got = torch.autograd.grad((logps * w_lp).sum() + (entropy * w_ent).sum(), hidden)[0]
    monkeypatch.undo()
    assert not recomputed
    want_lp, want_ent = _plain(hidden, weight, None, targets, temperature=0.6, softcap=3.0)
    want = torch.autograd.grad((want_lp * w_lp).sum() + (want_ent * w_ent).sum(), hidden)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
