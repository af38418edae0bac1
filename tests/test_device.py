"""What `auto` memory settings become on a CPU and with a GPU, and packed rows of one fixed shape."""

import pytest
import torch

from align import builtin, device, models
from align.data import collate, pack
from align.recipe import ModelConfig, load_recipe

from helpers import tiny_sft_recipe


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(device, "has_accelerator", lambda: False)


@pytest.fixture
def with_gpu(monkeypatch):
    monkeypatch.setattr(device, "has_accelerator", lambda: True)


def recipe(tmp_path, **overrides):
    return load_recipe(None, [], data=tiny_sft_recipe(tmp_path, **overrides))


def test_auto_on_a_cpu_keeps_activations_and_cuts_forwards_at_1024_tokens(tmp_path, cpu_only):
    r = recipe(tmp_path)
    assert r.model.gradient_checkpointing == "auto" and r.train.micro_batch_tokens == "auto"
    assert device.gradient_checkpointing(r.model.gradient_checkpointing) is False
    assert device.micro_batch_tokens(r) == device.CPU_MICRO_BATCH_TOKENS == 1024


def test_auto_with_a_gpu_checkpoints_and_keeps_one_forward(tmp_path, with_gpu):
    r = recipe(tmp_path)
    assert device.gradient_checkpointing(r.model.gradient_checkpointing) is True
    assert device.micro_batch_tokens(r) is None


def test_a_run_told_to_use_the_cpu_counts_as_cpu_even_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert device.has_accelerator()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu, or the two-process CPU launch
    assert not device.has_accelerator()


@pytest.mark.parametrize("overrides, checkpointing, budget", [
    ({"model.gradient_checkpointing": True}, True, None),  # checkpointing bounds the activations already
    ({"model.gradient_checkpointing": False, "train.micro_batch_tokens": None}, False, None),
    ({"train.micro_batch_tokens": 2048}, False, 2048),
])
def test_explicit_settings_win_over_auto(tmp_path, cpu_only, overrides, checkpointing, budget):
    r = recipe(tmp_path, **overrides)
    assert device.gradient_checkpointing(r.model.gradient_checkpointing) is checkpointing
    assert device.micro_batch_tokens(r) == budget


def test_micro_batch_tokens_rejects_a_word_other_than_auto_and_non_positive_numbers(tmp_path):
    from align.errors import AlignError

    for bad in ("al", 0, -5):
        with pytest.raises(AlignError, match="train.micro_batch_tokens"):
            recipe(tmp_path, **{"train.micro_batch_tokens": bad})


def test_loader_checkpoints_only_where_auto_says(cpu_only, monkeypatch):
    tok = builtin.load_tokenizer()
    assert not models.load_model(ModelConfig(), tok, seed=0).is_gradient_checkpointing
    monkeypatch.setattr(device, "has_accelerator", lambda: True)
    assert models.load_model(ModelConfig(), tok, seed=0).is_gradient_checkpointing


def test_packed_rows_at_full_width_give_the_same_loss_and_gradients():
    """Padding packed rows out to data.max_length (one shape every step) changes no trained logit."""
    from align.stages.sft import SFTStage

    tok = builtin.load_tokenizer()
    examples = []
    for a, b in [(12, 34), (5, 678), (90, 1), (33, 33), (7, 8), (41, 59)]:
        ids = tok(f"{a}+{b}=")["input_ids"]
        answer = tok(f"{a + b}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer})
    rows = pack(examples, 24)
    assert max(len(r["input_ids"]) for r in rows) < 24  # so that the full width really pads
    results = []
    for width in (None, 24):
        model = models.load_model(ModelConfig(gradient_checkpointing=False), tok, seed=0)
        batch = collate(rows, tok.pad_token_id, width=width)
        assert batch["input_ids"].shape[1] == (width or max(len(r["input_ids"]) for r in rows))
        loss, _ = SFTStage.loss(None, model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_packed_sft_forwards_have_one_shape(tmp_path, cpu_only, monkeypatch):
    """SFT's default (packing, auto memory settings on a CPU): every forward is (rows, data.max_length)."""
    from align import planning
    from align.stages.sft import SFTStage

    seen = []
    original = SFTStage.loss

    def spy(self, model, batch):
        seen.append(tuple(batch["input_ids"].shape))
        return original(self, model, batch)

    monkeypatch.setattr(SFTStage, "loss", spy)
    # 16 packed rows of 128 tokens per step = 2,048 tokens: two forwards of 1,024 under auto on a CPU
    planning.run(recipe(tmp_path, **{"data.max_length": 128, "train.batch_size": 16, "train.max_steps": 2,
                                   "data.train.take": 512}))
    assert seen == [(8, 128)] * 4


def test_a_run_caps_the_cpu_matmul_primitive_caches_unless_the_user_did(monkeypatch):
    """make_accelerator caps oneDNN's and ideep's per-shape primitive caches (align.device.bound_matmul_caches:
    under bf16 on a CPU they grew with every new batch shape); a capacity the user set is kept."""
    from align.accel import make_accelerator
    from align.recipe import TrainConfig

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    make_accelerator(TrainConfig(mixed_precision="no"), ".")
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(device.MATMUL_CACHE_CAPACITY) == "64"
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(device._malloc_trim() is None, reason="no glibc malloc_trim here")
def test_freed_heap_goes_back_to_the_system_on_a_cpu_only():
    """Tensors below glibc's mmap threshold live in its heap; freed with every other one kept, the holes
    stay resident until release_freed_heap (called by the engine after each backward and step) trims them."""
    device.release_freed_heap(torch.device("cpu"))
    tensors = [torch.ones(16_000) for _ in range(4_000)]  # 64 KB each, 256 MB in all
    del tensors[::2]
    before = _resident_mb()
    device.release_freed_heap(torch.device("meta"))  # not a CPU: nothing happens
    assert _resident_mb() > before - 20
    device.release_freed_heap(torch.device("cpu"))
    assert _resident_mb() < before - 80, (before, _resident_mb())
