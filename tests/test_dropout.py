"""Dropout is off in every stage by default (`model.disable_dropout`, TRL's `disable_dropout`).

Two defects this pins: attention modules of Llama/Qwen/Mistral/Gemma/Phi-3 copy
`config.attention_dropout` at construction, so zeroing the config afterwards left attention
dropout on; and the offline stages (DPO/SimPO/ORPO/reward) never disabled dropout at all, so
the reference log-probs (precomputed in eval mode) and the training forward (train mode)
differed at step 0 on a model with dropout.
"""

import json

import pytest
import torch

from align import models
from align.planning import run
from align.recipe import ModelConfig, load_recipe

from helpers import save_dropout_model


def _train_mode_forwards(folder, **cfg):
    tok = models.load_tokenizer(ModelConfig(name_or_path=str(folder)))
    model = models.load_model(ModelConfig(name_or_path=str(folder), **cfg), tok)
    model.train()
    ids = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    return model(ids).logits, model(ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loaded_model_is_deterministic_in_train_mode(tmp_path, arch):
    a, b = _train_mode_forwards(save_dropout_model(tmp_path / arch, arch, p=0.5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_disable_dropout_false_keeps_the_models_dropout(tmp_path, arch):
    a, b = _train_mode_forwards(save_dropout_model(tmp_path / arch, arch, p=0.5), disable_dropout=False)
    assert (a - b).abs().max() > 1e-3


def test_saved_config_keeps_its_dropout(tmp_path):
    folder = save_dropout_model(tmp_path / "m", "llama", p=0.3)
    tok = models.load_tokenizer(ModelConfig(name_or_path=str(folder)))
    model = models.load_model(ModelConfig(name_or_path=str(folder)), tok)
    assert model.config.attention_dropout == 0.3  # only the modules are switched off


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_offline_stage_step0_sees_no_dropout(tmp_path, stage):
    """GPT-2 with dropout 0.1. DPO: the step-0 implicit rewards beta * (log pi - log ref) are 0 (before the
    fix the chosen log-ratios were ~[0.04, -0.03, -0.02, 0.14]). Reward: the train-mode step-0 loss equals
    the eval-mode loss of the same pairs."""
    folder = save_dropout_model(tmp_path / "gpt2", "gpt2", p=0.1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)})
                             + "\n" for a, b in [(12, 7), (33, 41), (5, 80), (27, 27), (64, 3), (18, 49)]))
    recipe = load_recipe(None, [f"stage={stage}", f"output_dir={tmp_path / 'out'}", f"model.name_or_path={folder}",
                                f"data.train={pairs}", f"data.eval={pairs}", "data.max_length=16",
                                "train.batch_size=6", "train.max_steps=1", "train.log_steps=1",
                                "train.progress_bar=false", "eval.generate=false"])
    metrics = run(recipe)
    first = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()][1]
    if stage == "dpo":
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
        assert first["train/loss"] == pytest.approx(0.693147, abs=1e-5)
    else:
        assert first["train/loss"] == pytest.approx(metrics["eval/loss_start"], abs=1e-5)
