"""Bad input: one clear line on stderr, exit status 2, no traceback, no partial model written."""

import json

import pytest
import yaml

from align.cli import main

from helpers import tiny_sft_recipe


def _write(tmp_path, recipe, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _expect_exit_2(capsys, argv, message, output_dir=None):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    assert message in lines[-1], lines[-1]
    if output_dir is not None:
        assert not (output_dir / "model.safetensors").exists()
        assert not (output_dir / "metrics.json").exists()
    return lines[-1]


def _data(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_recipe_typo_and_unknown_key(tmp_path, capsys, out):
    recipe = tiny_sft_recipe(out)
    recipe["train"]["lerning_rate"] = 1e-3
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "unknown key train.lerning_rate; did you mean train.lr",
                   out)
    recipe = tiny_sft_recipe(out)  # TRL's name is accepted, but not beside align's
    recipe["train"]["learning_rate"] = 1e-3
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "train.learning_rate and train.lr are both set", out)
    _expect_exit_2(capsys, ["train", _write(tmp_path, tiny_sft_recipe(out)), "train.bach_size=4"],
                   "did you mean train.batch_size", out)
    _expect_exit_2(capsys, ["train", str(tmp_path / "nope.yaml")], "file not found", out)
    (tmp_path / "bad.yaml").write_text("stage: sft\n  output_dir: [\n")
    _expect_exit_2(capsys, ["train", str(tmp_path / "bad.yaml")], "not valid YAML", out)


def test_usage_errors_exit_2(capsys):
    _expect_exit_2(capsys, ["trian"], "invalid choice")
    _expect_exit_2(capsys, ["train"], "required")


def test_missing_column_names_file_row_and_expected(tmp_path, capsys, out):
    data = _data(tmp_path, [{"prompt": "1+1=", "completion": "2"}] * 3 + [{"prompt": "2+2="}])
    recipe = tiny_sft_recipe(out, **{"data.train": data})
    line = _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "d.jsonl row 4", out)
    assert "completion" in line


def test_empty_dataset(tmp_path, capsys, out):
    (tmp_path / "empty.jsonl").write_text("\n")
    recipe = tiny_sft_recipe(out, **{"data.train": str(tmp_path / "empty.jsonl")})
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "has no rows", out)


def test_prompts_longer_than_max_length(tmp_path, capsys, out):
    """Cutting only the ends (data.prompt_truncation: keep_start) leaves no answer token: one line, exit 2.
    (The default keep_end cuts the prompt's beginning instead: tests/test_data.py.)"""
    data = _data(tmp_path, [{"prompt": "1" * 40 + "=", "completion": "2"}] * 8)
    recipe = tiny_sft_recipe(out, **{"data.train": data, "data.max_length": 16, "data.prompt_truncation": "keep_start"})
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "no trainable token left", out)


def _gpt2_folder(tmp_path, *, score_head: bool) -> str:
    """A tiny GPT-2 (128 learned positions) with the built-in character tokenizer; a reward model (score head)
    or a causal LM, so that loading it logs no missing-weights report."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from align import builtin

    tok = builtin.load_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path / ("gpt2-rm" if score_head else "gpt2")
    (GPT2ForSequenceClassification if score_head else GPT2LMHeadModel)(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "grpo", "eval-rm"])
def test_sequences_longer_than_a_learned_position_table(tmp_path, capsys, out, stage):
    """GPT-2-style models look positions up in a table (n_positions): a longer sequence is an IndexError deep
    in the embedding on CPU (a device-side assert on a GPU). One clear line, before any step, instead."""
    folder = _gpt2_folder(tmp_path, score_head=stage in ("reward", "eval-rm"))
    long = "1+1=" * 40  # 160 characters, one token each
    recipe = tiny_sft_recipe(out, **{"model.name_or_path": folder, "data.max_length": 256})
    if stage == "sft":
        recipe["data"]["train"] = _data(tmp_path, [{"prompt": long, "completion": "2"}] * 8)
    elif stage in ("reward", "dpo", "eval-rm"):
        recipe["stage"] = "dpo" if stage == "dpo" else "reward"
        recipe["data"]["train"] = _data(tmp_path, [{"prompt": long, "chosen": "2", "rejected": "3"}] * 8)
    else:
        recipe.update(stage="grpo", grpo={"num_generations": 2, "max_new_tokens": 8})
        recipe["data"]["train"] = _data(tmp_path, [{"prompt": long[:124], "completion": "2"}] * 8)
    if stage == "eval-rm":
        _expect_exit_2(capsys, ["eval-rm", "--model", folder, "--data", recipe["data"]["train"], "--max-length", "256"],
                       "128 positions")
        return
    message = _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "128 positions", out)
    assert ("data.max_length" if stage != "grpo" else "grpo.max_new_tokens") in message


def _model_folder(tmp_path, *, pad: bool, chat_template: bool):
    from transformers import AutoModelForCausalLM

    from align import builtin

    tok = builtin.build_tokenizer()
    model = AutoModelForCausalLM.from_config(builtin.model_config("builtin:tiny", tok))
    if not pad:
        tok.pad_token = None
    if not chat_template:
        tok.chat_template = None
    folder = tmp_path / f"model-pad{pad}-chat{chat_template}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_tokenizer_without_pad_token_or_chat_template(tmp_path, capsys, out):
    recipe = tiny_sft_recipe(out, **{"model.name_or_path": _model_folder(tmp_path, pad=False, chat_template=True)})
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "has no pad token; set model.pad_token", out)
    messages = [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}] * 8
    recipe = tiny_sft_recipe(out, **{"model.name_or_path": _model_folder(tmp_path, pad=True, chat_template=False),
                                     "data.train": _data(tmp_path, messages)})
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "needs a chat template", out)


def test_nan_loss_stops_with_a_clear_message_and_no_model(tmp_path, capsys, out, monkeypatch):
    import torch

    from align.logprobs import OutputHead

    real = OutputHead.token_logprobs
    monkeypatch.setattr(OutputHead, "token_logprobs",
                        lambda self, *args, **kwargs: real(self, *args, **kwargs) * torch.tensor(float("nan")))
    _expect_exit_2(capsys, ["train", _write(tmp_path, tiny_sft_recipe(out))], "not finite", out)


def test_existing_results_survive_bad_input(tmp_path, capsys, out):
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": 1}')
    recipe = tiny_sft_recipe(out)
    recipe["train"]["lr"] = 0
    _expect_exit_2(capsys, ["train", _write(tmp_path, recipe)], "train.lr > 0")
    assert (out / "metrics.json").read_text() == '{"keep": 1}'
