"""`align eval-rm`: accuracy against an independent computation, ties, subsets, JSON and PNG,
a LoRA adapter folder, the CLI, two processes, and real HH-RLHF data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from align import models
from align.cli import main
from align.evaluate_rm import evaluate_reward_model, score_pairs
from align.recipe import ModelConfig

from helpers import accelerate_launch

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
DESIGN_KEYS = {"accuracy", "n", "ties", "mean_margin", "subsets"}


def _save_score_model(folder, *, scale=1.0, seed=0):
    """A builtin:tiny reward model with a random (or scaled) score head, saved as a Hugging Face folder."""
    tok = models.load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    model = models.load_model(ModelConfig(name_or_path="builtin:tiny"), tok, head="score", seed=seed)
    with torch.no_grad():
        torch.manual_seed(seed)
        model.score.weight.normal_(0, 1.0).mul_(scale)
    models.save_pretrained(model, tok, folder)
    return tok


def _write_pairs(path, n=40):
    rows = []
    with open(REPO / "data/arith/prefs_eval.jsonl") as f:
        for i, line in enumerate(f):
            if i == n:
                break
            row = json.loads(line)
            row["subset"] = "odd" if i % 2 else "even"
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _independent_rewards(folder, tok, rows):
    """Each sequence alone through plain transformers (no padding, so its pooling is right)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for row in rows:
        pair = []
        for side in ("chosen", "rejected"):
            ids = tok(row["prompt"])["input_ids"] + tok(row[side], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                pair.append(model(input_ids=torch.tensor([ids + [tok.eos_token_id]])).logits[0, 0].item())
        out.append(pair)
    return torch.tensor(out)


def test_eval_rm_matches_an_independent_computation_and_writes_json_and_png(tmp_path):
    folder = tmp_path / "rm"
    tok = _save_score_model(folder)
    rows = _write_pairs(tmp_path / "pairs.jsonl")
    summary = evaluate_reward_model(str(folder), str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "o.json"),
                                    plot=str(tmp_path / "o.png"), batch_size=7, quiet=True)
    rewards = _independent_rewards(folder, tok, rows)
    correct = rewards[:, 0] > rewards[:, 1]
    assert 0 < correct.sum() < len(rows)  # a random head: some right, some wrong
    assert summary["n"] == len(rows)
    assert summary["accuracy"] == pytest.approx(correct.float().mean().item())
    assert summary["mean_margin"] == pytest.approx((rewards[:, 0] - rewards[:, 1]).mean().item(), abs=1e-4)
    for name, parity in (("even", 0), ("odd", 1)):
        assert summary["subsets"][name] == pytest.approx(correct[parity::2].float().mean().item())
    written = json.loads((tmp_path / "o.json").read_text())
    assert DESIGN_KEYS <= set(written) and written["accuracy"] == pytest.approx(summary["accuracy"])
    assert sum(b["n"] for b in written["length_buckets"]) == len(rows)
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ties_count_as_wrong_and_are_reported(tmp_path):
    folder = tmp_path / "rm"
    _save_score_model(folder, scale=0.0)  # every reward is 0
    _write_pairs(tmp_path / "pairs.jsonl", n=10)
    summary = evaluate_reward_model(str(folder), str(tmp_path / "pairs.jsonl"), quiet=True)
    assert summary["ties"] == 10 and summary["accuracy"] == 0.0


def test_eval_rm_on_a_lora_adapter_folder(tmp_path):
    base = tmp_path / "base"
    tok = models.load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    models.save_pretrained(models.load_model(ModelConfig(name_or_path="builtin:tiny"), tok), tok, base)
    cfg = ModelConfig(name_or_path=str(base))
    cfg.lora.enabled, cfg.lora.r = True, 4
    peft_model = models.load_model(cfg, tok, head="score", seed=0)
    assert models.is_peft(peft_model)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # lora_A/B and the trained copy of the score head
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    models.save_pretrained(peft_model, tok, adapter)
    assert (adapter / "adapter_config.json").is_file()
    rows = _write_pairs(tmp_path / "pairs.jsonl", n=16)
    summary = evaluate_reward_model(str(adapter), str(tmp_path / "pairs.jsonl"), quiet=True)

    from align.data import load_rows
    from align.preference_data import tokenize_preferences

    pairs = tokenize_preferences(load_rows(str(tmp_path / "pairs.jsonl")), tok, max_length=64, key="t")
    chosen, rejected = score_pairs(peft_model.eval(), pairs.examples, tok.pad_token_id, batch_size=4)
    assert summary["n"] == len(rows)
    assert summary["mean_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-4)
    assert summary["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())


def test_cli_eval_rm_prints_a_table_and_rejects_bad_data(tmp_path, capsys):
    folder = tmp_path / "rm"
    _save_score_model(folder)
    _write_pairs(tmp_path / "pairs.jsonl", n=12)
    assert main(["eval-rm", "--model", str(folder), "--data", str(tmp_path / "pairs.jsonl"),
                 "--output", str(tmp_path / "o.json"), "--batch-size", "5"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "ties" in out and "odd" in out and "longer answer wins" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    assert main(["eval-rm", "--model", str(folder), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "missing column 'rejected'" in err and "bad.jsonl row 1" in err


@pytest.mark.skipif(not HH.is_file(), reason="shared HH-RLHF file not present")
def test_eval_rm_on_real_hh_rlhf_pairs(tmp_path):
    folder = tmp_path / "rm"
    _save_score_model(folder)
    summary = evaluate_reward_model(str(folder), {"path": str(HH), "take": 48}, max_length=256, batch_size=16,
                                    quiet=True)
    assert summary["n"] + summary["dropped_identical"] + summary["dropped_empty"] == 48
    assert summary["n"] >= 40 and summary["truncated"] > 0
    assert 0.0 <= summary["longer_wins"] <= 1.0 and 0.0 <= summary["chosen_longer"] <= 1.0


@pytest.mark.slow
def test_eval_rm_under_accelerate_launch_with_two_processes_equals_one(tmp_path):
    folder = tmp_path / "rm"
    _save_score_model(folder)
    _write_pairs(tmp_path / "pairs.jsonl", n=25)  # 25 pairs: uneven shards (13 + 12)
    one = evaluate_reward_model(str(folder), str(tmp_path / "pairs.jsonl"), batch_size=4, quiet=True)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                              "--dynamo_backend", "no", "-m", "align", "eval-rm", "--model", str(folder), "--data",
                              str(tmp_path / "pairs.jsonl"), "--batch-size", "4", "--output", str(tmp_path / "two.json")],
                             env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("mean margin") == 1  # printed by the main process only
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["n"] == one["n"] == 25
    assert two["accuracy"] == pytest.approx(one["accuracy"])
    assert two["mean_margin"] == pytest.approx(one["mean_margin"], abs=1e-5)
    assert two["subsets"] == pytest.approx(one["subsets"])
