"""The data layer: formats, exact completion-only masks, truncation, packing, batching."""

import json

import pytest
import torch

from align import builtin
from align.data import (
    IGNORE,
    GlobalBatches,
    collate,
    load_rows,
    pack,
    split_by_token_budget,
    split_global_batch,
    tokenize_sft,
)
from align.errors import AlignError


@pytest.fixture(scope="module")
def tok():
    return builtin.load_tokenizer()


def _rows(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_rows(str(path))


def _chars(tok, ids):
    return [tok.convert_ids_to_tokens(i) for i in ids]


def test_prompt_completion_mask_token_by_token(tmp_path, tok):
    rows = _rows(tmp_path, [{"prompt": "12+34=", "completion": "46"}])
    ex = tokenize_sft(rows, tok, max_length=64, truncation="keep_start", key="data.train").examples[0]
    assert _chars(tok, ex["input_ids"]) == ["<bos>", "1", "2", "+", "3", "4", "=", "4", "6", "<eos>"]
    trained = [tok.convert_ids_to_tokens(label) for label in ex["labels"] if label != IGNORE]
    assert trained == ["4", "6", "<eos>"]
    # the trained positions are exactly the completion's, in place
    assert [i for i, label in enumerate(ex["labels"]) if label != IGNORE] == [7, 8, 9]


def test_conversational_messages_mask_every_assistant_turn(tmp_path, tok):
    messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    rows = _rows(tmp_path, [{"messages": messages}])
    ex = tokenize_sft(rows, tok, max_length=64, truncation="keep_start", key="data.train").examples[0]
    tokens = _chars(tok, ex["input_ids"])
    assert tokens == ["<bos>", "<|user|>", "1", "+", "1", "<|assistant|>", "2", "<eos>",
                      "<|user|>", "2", "+", "2", "<|assistant|>", "4", "<eos>"]
    trained = [t if label != IGNORE else None for t, label in zip(tokens, ex["labels"])]
    assert trained == [None] * 6 + ["2", "<eos>"] + [None] * 5 + ["4", "<eos>"]


# Phi-3-mini's template: turns end with <|end|>, and a conversation rendered WITHOUT a generation prompt ends
# with EOS, which an earlier turn followed by later ones does not have (here "\n" stands for <|end|>)
PHI3_LIKE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")


def test_a_template_that_closes_the_conversation_with_eos_trains_each_turn(tmp_path):
    """Before the fix every multi-turn Phi-3 conversation was refused as boundary drift."""
    tok = builtin.load_tokenizer()
    tok.chat_template = PHI3_LIKE
    messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    ex = tokenize_sft(_rows(tmp_path, [{"messages": messages}]), tok, max_length=64, truncation="keep_start",
                      key="data.train").examples[0]
    trained = [t for t, label in zip(_chars(tok, ex["input_ids"]), ex["labels"]) if label != IGNORE]
    assert trained == ["2", "\n", "4", "\n", "<eos>"]


def test_a_template_that_rewrites_earlier_turns_is_still_refused(tmp_path):
    """A template that renders an earlier reply differently once later turns follow (as reasoning templates
    drop earlier thinking) would misplace the mask: refused."""
    tok = builtin.load_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if loop.last or m['role'] != "
                         "'assistant' %}{{ m['content'] }}{% else %}{{ '...' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(AlignError, match="boundary drift"):
        tokenize_sft(_rows(tmp_path, [{"messages": messages}]), tok, max_length=64, truncation="keep_start",
                     key="data.train")


def test_conversational_prompt_completion(tmp_path, tok):
    rows = _rows(tmp_path, [{"prompt": [{"role": "user", "content": "9+9"}],
                             "completion": [{"role": "assistant", "content": "18"}]}])
    ex = tokenize_sft(rows, tok, max_length=64, truncation="keep_start", key="data.train").examples[0]
    tokens = _chars(tok, ex["input_ids"])
    assert tokens[:6] == ["<bos>", "<|user|>", "9", "+", "9", "<|assistant|>"]
    assert [t for t, label in zip(tokens, ex["labels"]) if label != IGNORE] == ["1", "8", "<eos>"]


def test_text_format_trains_every_token_but_the_first(tmp_path, tok):
    rows = _rows(tmp_path, [{"text": "ab"}])
    ex = tokenize_sft(rows, tok, max_length=64, truncation="keep_start", key="data.train").examples[0]
    assert ex["labels"][0] == IGNORE and ex["labels"][1:] == ex["input_ids"][1:]


def test_truncation_drops_samples_without_trainable_tokens_and_counts_them(tmp_path, tok):
    rows = _rows(tmp_path, [{"prompt": "1234567890=", "completion": "1"}, {"prompt": "1+1=", "completion": "2"}])
    out = tokenize_sft(rows, tok, max_length=8, truncation="keep_start", key="data.train")
    assert len(out) == 1 and out.dropped == 1
    assert out.examples[0]["input_ids"][1:5] == tok("1+1=", add_special_tokens=False)["input_ids"]
    # keep_start cuts the end of the completion but keeps what fits
    out = tokenize_sft(_rows(tmp_path, [{"prompt": "1+1=", "completion": "222222"}]), tok, max_length=7,
                       truncation="keep_start", key="data.train")
    assert len(out.examples[0]["input_ids"]) == 7 and out.truncated == 1
    out = tokenize_sft(_rows(tmp_path, [{"prompt": "1+1=", "completion": "222222"}, {"prompt": "1+1=", "completion": "2"}]),
                       tok, max_length=7, truncation="drop", key="data.train")
    assert out.dropped == 1 and out.truncated == 0 and len(out) == 1


def test_all_samples_dropped_is_an_error(tmp_path, tok):
    rows = _rows(tmp_path, [{"prompt": "1234567890=", "completion": "1"}])
    with pytest.raises(AlignError, match="no trainable token left"):
        tokenize_sft(rows, tok, max_length=5, truncation="keep_start", key="data.train")


def test_errors_name_file_row_and_expected_columns(tmp_path, tok):
    rows = _rows(tmp_path, [{"question": "1+1", "answer": "2"}], name="bad.jsonl")
    with pytest.raises(AlignError, match=r"bad.jsonl row 1 has columns \['answer', 'question'\]; expected text"):
        tokenize_sft(rows, tok, max_length=64, truncation="keep_start", key="data.train")
    rows = _rows(tmp_path, [{"prompt": "1+1=", "completion": "2"}, {"prompt": "1+2=", "completion": ""}],
                 name="empty.jsonl")
    with pytest.raises(AlignError, match="empty.jsonl row 2 has an empty 'completion'"):
        tokenize_sft(rows, tok, max_length=64, truncation="keep_start", key="data.train")
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(AlignError, match="has no rows"):
        load_rows(str(tmp_path / "none.jsonl"))
    with pytest.raises(AlignError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1"}\n{oops\n')
    with pytest.raises(AlignError, match="broken.jsonl line 2: not valid JSON"):
        load_rows(str(tmp_path / "broken.jsonl"))


def test_other_file_formats_and_mixtures(tmp_path):
    import pandas as pd

    pd.DataFrame([{"prompt": "1+1=", "completion": "2"}]).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame([{"prompt": "2+2=", "completion": "4"}]).to_csv(tmp_path / "b.csv", index=False)
    rows = load_rows([str(tmp_path / "a.parquet"), {"path": str(tmp_path / "b.csv"), "take": 1}])
    assert [str(r["completion"]) for r in rows.rows] == ["2", "4"]
    assert rows.where(1).endswith("b.csv row 1")


def test_missing_chat_template_is_a_clear_error(tmp_path, tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    rows = _rows(tmp_path, [{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]}])
    with pytest.raises(AlignError, match="needs a chat template"):
        tokenize_sft(rows, plain, max_length=64, truncation="keep_start", key="data.train")


def test_packing_keeps_samples_whole_and_restarts_positions():
    examples = [{"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6]}, {"input_ids": [1, 7], "labels": [IGNORE, 7]},
                {"input_ids": [1, 8, 9, 10], "labels": [IGNORE, 8, 9, 10]}]
    rows = pack(examples, max_length=5)
    assert [r["input_ids"] for r in rows] == [[1, 5, 6, 1, 7], [1, 8, 9, 10]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch  # attention follows position_ids
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]
    assert batch["labels"][1].tolist() == [IGNORE, 8, 9, 10, IGNORE]


def test_packing_is_best_fit_decreasing_and_loses_no_sample():
    lengths = [7, 2, 5, 3, 6, 1, 4]
    examples = [{"input_ids": [1] + [10 + i] * (n - 1), "labels": [IGNORE] + [10 + i] * (n - 1)}
                for i, n in enumerate(lengths)]
    rows = pack(examples, max_length=8)
    # best fit: 7+1, 6+2, 5+3, 4 -> four rows (next-fit in file order would need five)
    assert sorted(len(r["input_ids"]) for r in rows) == [4, 8, 8, 8]
    packed_tokens = sorted(t for r in rows for t in r["input_ids"])
    assert packed_tokens == sorted(t for e in examples for t in e["input_ids"])
    assert all(r["position_ids"].count(0) == sum(1 for t in r["input_ids"] if t == 1) for r in rows)


def test_padding_free_collation_is_one_row():
    examples = [{"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6]}, {"input_ids": [1, 7], "labels": [IGNORE, 7]}]
    batch = collate(examples, pad_id=0, padding_free=True)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_packed_row_matches_separate_forward():
    """A packed row gives each sample the logits it gets alone (attention stays within samples)."""
    from transformers import AutoModelForCausalLM

    tok = builtin.load_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(builtin.model_config("builtin:tiny", tok)).eval()
    a, b = [1, 20, 21, 22], [1, 30, 31]
    packed = collate(pack([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], 16), pad_id=0)
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers ignores packed position_ids
        joint = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(joint[4:7], alone_b, atol=1e-5, rtol=1e-4)


def test_global_batches_are_deterministic_and_split_exactly():
    lengths = [i % 7 + 1 for i in range(100)]
    gb = GlobalBatches(lengths, 8, seed=3)
    assert gb.per_epoch == 12
    assert gb[5] == GlobalBatches(lengths, 8, seed=3)[5]
    assert gb[5] != GlobalBatches(lengths, 8, seed=4)[5]
    epoch0 = [i for s in range(12) for i in gb[s]]
    assert len(set(epoch0)) == 96  # no sample twice within an epoch
    parts = [split_global_batch(gb[5], lengths, micro_batches=2, process=p, processes=2) for p in range(2)]
    flat = sorted(i for proc in parts for micro in proc for i in micro)
    assert flat == sorted(gb[5]) and all(len(m) == 2 for proc in parts for m in proc)
    with pytest.raises(AlignError, match="global batch needs 200"):
        GlobalBatches(lengths, 200, seed=0)


def test_shipped_files_are_reproducible(tmp_path):
    """data/make_data.py's output equals the committed files (the split is what data/README.md says)."""
    from pathlib import Path

    from align import task

    task.make_files(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    for name in ["sft_train.jsonl", "sft_eval.jsonl", "prefs_train.jsonl", "prefs_eval.jsonl", "teacher_train.jsonl",
                 "teacher_eval.jsonl", "teacher_prefs_train.jsonl", "teacher_prefs_eval.jsonl"]:
        assert (tmp_path / name).read_text() == (repo / "data" / "arith" / name).read_text(), name
    train = {json.loads(line)["prompt"] for line in (repo / "data/arith/sft_train.jsonl").read_text().splitlines()}
    held = {json.loads(line)["prompt"] for line in (repo / "data/arith/sft_eval.jsonl").read_text().splitlines()}
    assert len(held) == 2000 and not train & held
    fresh = builtin.build_tokenizer()
    fresh.save_pretrained(str(tmp_path / "tok"))
    assert json.loads((tmp_path / "tok/tokenizer.json").read_text()) == \
        json.loads((builtin.TOKENIZER_DIR / "tokenizer.json").read_text())


def test_token_budget_split_keeps_every_example_once_under_the_budget():
    widths = [5, 40, 12, 12, 3, 30, 7, 100, 8]
    chunks = split_by_token_budget(list(range(len(widths))), widths, 48, rows_per_example=2)
    assert sorted(i for c in chunks for i in c) == list(range(len(widths)))
    for chunk in chunks:
        cost = 2 * len(chunk) * max(widths[i] for i in chunk)
        assert cost <= 48 or len(chunk) == 1  # an example wider than the budget goes alone
    assert chunks[0] == [7] and chunks[1] == [1]  # longest first: 100 and 40 alone (2 rows each)
    assert chunks == split_by_token_budget(list(reversed(range(len(widths)))), widths, 48, rows_per_example=2)


def test_right_padded_batches_drop_the_mask_without_changing_a_real_logit():
    from align import models
    from align.data import without_causal_padding_mask
    from align.recipe import ModelConfig

    tok = builtin.load_tokenizer()
    model = models.load_model(ModelConfig(), tok, seed=0).eval()
    examples = [{"input_ids": [1, 20, 21, 22, 23, 24], "labels": [IGNORE] * 6},
                {"input_ids": [1, 30, 31], "labels": [IGNORE] * 3}]
    batch = collate(examples, pad_id=0)
    lean = without_causal_padding_mask(batch)
    assert "attention_mask" not in lean and "attention_mask" in batch
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = model(input_ids=lean["input_ids"]).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(masked[real], unmasked[real], atol=1e-5)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    assert without_causal_padding_mask(left) is left  # left padding keeps its mask


def test_a_local_file_takes_a_split_slice(tmp_path):
    from align.data import load_rows

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    assert [r["i"] for r in load_rows({"path": str(path), "split": "test[7:]"}, key="data.eval").rows] == [7, 8, 9]
    assert [r["i"] for r in load_rows({"path": str(path), "split": "train[:2]"}, key="data.train").rows] == [0, 1]
    assert len(load_rows({"path": str(path), "split": "train"}, key="data.train").rows) == 10
    with pytest.raises(AlignError, match=r"data.train: split 'train\[a:\]'; expected a slice"):
        load_rows({"path": str(path), "split": "train[a:]"}, key="data.train")


def test_eval_limit_applies_once_to_raw_rows(tmp_path):
    """data.eval_limit keeps the first N held-out rows, for every stage, before tokenizing (the reward stage cut
    its tokenized pairs instead)."""
    from align.data import load_eval_rows
    from align.recipe import DataConfig

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    rows = load_eval_rows(DataConfig(train="x", eval=str(path), eval_limit=3))
    assert [r["i"] for r in rows.rows] == [0, 1, 2] and rows.where(2).endswith("row 3")
    assert len(load_eval_rows(DataConfig(train="x", eval=str(path))).rows) == 10
    assert load_eval_rows(DataConfig(train="x")) is None


def test_a_long_sft_prompt_loses_its_beginning_first(tmp_path, tok):
    """data.prompt_truncation: keep_end (the SFT stage's default) keeps the answer of a long dialogue whole and
    the latest part of its prompt; keep_start cuts the answer's end, as before."""
    from align.data import cut_sft_sample

    rows = _rows(tmp_path, [{"prompt": "x" * 40 + "12+34=", "completion": "46"}])
    end = tokenize_sft(rows, tok, max_length=16, truncation="keep_start", key="data.train",
                       prompt_truncation="keep_end").examples[0]
    assert len(end["input_ids"]) == 16 and _chars(tok, end["input_ids"][:1]) == ["<bos>"]
    assert "".join(_chars(tok, end["input_ids"][-5:])) == "4=46<eos>"
    assert [t for t, label in zip(_chars(tok, end["input_ids"]), end["labels"]) if label != IGNORE] == [
        "4", "6", "<eos>"]
    with pytest.raises(AlignError, match="no trainable token"):  # the answer was cut away entirely
        tokenize_sft(rows, tok, max_length=16, truncation="keep_start", key="data.train",
                     prompt_truncation="keep_start").examples[0]
    # a sample whose trained tokens are not one final answer (text, several turns) is only cut at its end
    ids, labels = list(range(10)), [IGNORE, 1, 2, IGNORE, 4, 5, 6, 7, 8, 9]
    assert cut_sft_sample(ids, labels, 6, prompt_truncation="keep_end") == (ids[:6], labels[:6])
