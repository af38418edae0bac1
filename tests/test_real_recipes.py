"""The real-scale recipes (recipes/qwen2.5-*): schema, launch config and memory estimate, without the hub.

Nothing here downloads (HF_HUB_OFFLINE=1 from conftest; `align check` reads no weights): the
model shapes are the public Qwen2.5 config.json values, written to tmp_path. Also the pieces the
GSM8K GRPO recipes rely on (a data-spec column mapping, the math reward) and the QLoRA error
paths (4-bit loading itself needs a GPU and bitsandbytes: not run here).
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from align import data, models, rewards
from align.check import check
from align.errors import AlignError
from align.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("qwen2.5-*/*.yaml"))

# the public config.json shapes (Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-7B; the Instruct models share them)
QWEN = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
}


def _header(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))


def test_every_stage_and_variant_is_shipped():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for size in ("qwen2.5-0.5b", "qwen2.5-7b"):
        stages = {load_recipe(REPO / "recipes" / n).stage for n in names if n.startswith(size + "/")}
        assert {"sft", "reward", "dpo", "grpo"} <= stages, (size, stages)
    assert {"qwen2.5-0.5b/grpo.yaml", "qwen2.5-0.5b/grpo-lora.yaml", "qwen2.5-7b/grpo-lora.yaml",
            "qwen2.5-7b/reward-lora.yaml", "qwen2.5-7b/sft-qlora.yaml", "qwen2.5-7b/dpo-qlora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_schema_launch_and_memory_offline(path, tmp_path):
    recipe = load_recipe(path)
    header = _header(path)
    assert "not run here" in header.lower() and "memory" in header.lower(), path
    launch = re.search(r"launch/[\w.]+\.yaml", header)
    assert launch and (REPO / launch.group()).is_file(), f"{path}: header names no existing launch config"
    # every hub source is a well-formed spec (nothing read)
    for spec in (recipe.data.train, recipe.data.eval):
        for one in spec if isinstance(spec, list) else [spec]:
            if one is not None:
                data._parse_spec(one, "data")
    size = "0.5b" if "0.5b" in path.parent.name else "7b"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **QWEN[size]}))
    report = check(str(path), launch=str(REPO / launch.group()), model_config=str(config), print_fn=None)
    assert report.estimate is not None, path
    assert report.estimate.peak < 80 * 2**30, f"{path}: estimated peak exceeds an 80 GiB GPU"
    if recipe.model.quantization.load_in_4bit:
        assert recipe.model.lora.enabled and "bitsandbytes" in header


def test_gsm8k_recipes_read_questions_as_chat_prompts():
    recipe = load_recipe(REPO / "recipes/qwen2.5-0.5b/grpo.yaml")
    assert recipe.data.train["path"] == "openai/gsm8k" and recipe.data.train["columns"] == {"question": "prompt"}
    assert recipe.stage_args.reward_funcs == ["math_answer", "math_format"]
    for name in recipe.stage_args.reward_funcs:
        rewards.resolve(name)


# -- data spec: columns / chat_prompt -----------------------------------------------------
def _gsm8k_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 1,000 + 234?", "answer": "#### 1,234"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_columns_rename_and_chat_prompt(tmp_path):
    path = _gsm8k_file(tmp_path)
    rows = data.load_rows({"path": str(path), "columns": {"question": "prompt"}}).rows
    assert rows[0] == {"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}
    chat = data.load_rows({"path": str(path), "columns": {"question": "prompt"}, "chat_prompt": "Be brief."}).rows
    assert chat[1]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 1,000 + 234?"}]
    user = data.load_rows({"path": str(path), "columns": {"question": "prompt"}, "chat_prompt": True}).rows
    assert user[0]["prompt"] == [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}]
    # a conversational prompt goes through the chat template with the generation prompt (builtin tokenizer)
    from align import builtin

    tok = builtin.load_tokenizer()
    ids = data.encode_prompt(tok, user[0]["prompt"])
    assert ids == data.chat_ids(tok, user[0]["prompt"], add_generation_prompt=True) and len(ids) > 30


def test_chat_prompt_makes_string_answers_the_assistant_turn(tmp_path):
    """GSM8K for SFT (`columns: {question: prompt, answer: completion}, chat_prompt: true`): the string
    completion becomes the assistant's reply, so SFT trains on it through the chat template (it was
    refused: "prompt and completion must both be strings or both message lists"); the same for the
    chosen/rejected answers of an explicit-prompt preference file."""
    from align import builtin
    from align.preference_data import tokenize_preferences

    path = _gsm8k_file(tmp_path)
    spec = {"path": str(path), "columns": {"question": "prompt", "answer": "completion"}, "chat_prompt": True}
    rows = data.load_rows(spec)
    assert rows.rows[0]["completion"] == [{"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]
    tok = builtin.load_tokenizer()
    example = data.tokenize_sft(rows, tok, max_length=256, truncation="keep_start", key="data.train").examples[0]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != data.IGNORE]
    assert tok.decode(trained) == "3 + 4 = 7\n#### 7" + tok.eos_token
    assert example["input_ids"][: len(example["input_ids"]) - len(trained)] == data.encode_prompt(
        tok, rows.rows[0]["prompt"])
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"question": "2+2?", "chosen": "#### 4", "rejected": "#### 5"}) + "\n")
    rows = data.load_rows({"path": str(prefs), "columns": {"question": "prompt"}, "chat_prompt": True})
    assert rows.rows[0]["rejected"] == [{"role": "assistant", "content": "#### 5"}]
    pair = tokenize_preferences(rows, tok, max_length=256, key="data.train").examples[0]
    assert tok.decode(pair["chosen_ids"]) == "#### 4" + tok.eos_token


def test_column_mapping_errors(tmp_path):
    path = _gsm8k_file(tmp_path)
    with pytest.raises(AlignError, match=r"gsm.jsonl row 1 has no column 'problem'"):
        data.load_rows({"path": str(path), "columns": {"problem": "prompt"}}, key="data.train")
    with pytest.raises(AlignError, match="chat_prompt needs a string 'prompt'"):
        data.load_rows({"path": str(path), "chat_prompt": True})
    with pytest.raises(AlignError, match="columns must map"):
        data.load_rows({"path": str(path), "columns": ["question"]})
    with pytest.raises(AlignError, match="columns, chat_prompt"):
        data.load_rows({"path": str(path), "colums": {"question": "prompt"}})


# -- math reward ---------------------------------------------------------------------------
def test_final_number_hand_cases():
    cases = {
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72": "72",  # a GSM8K reference
        "#### 1,234": "1234",
        "The answer is 18. #### 18 apples": "18",
        "First 3, then 5, so 8": "8",  # no ####: the last number
        "#### -4.50": "-4.5",
        "It costs $0.50": "0.5",
        "#### 12.0": "12",
        "no number": None,
        "#### done, earlier 5": "5",  # nothing after ####: fall back to the last number
    }
    assert {text: rewards.final_number(text) for text in cases} == cases


def test_math_answer_and_format_rewards():
    answers = ["Janet has 16 - 3 - 4 = 9 eggs\n#### 18", "#### 1,000", "#### 3", "#### 3"]
    completions = ["9 eggs at $2 each: 9 * 2 = 18.\n#### 18", "One thousand: 1000", "#### 3.0", "It is 33"]
    assert rewards.math_answer(["q"] * 4, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    assert rewards.math_format(["q"] * 4, completions) == [1.0, 0.0, 1.0, 0.0]
    assert rewards.resolve("math_answer") is rewards.math_answer
    combined = rewards.weighted_sum([rewards.math_answer, rewards.math_format], [1.0, 0.2])
    assert combined(["q"] * 4, completions, answer=answers) == pytest.approx([1.2, 1.0, 1.2, 0.0])
    with pytest.raises(AlignError, match="needs an 'answer' column"):
        rewards.math_answer(["q"], ["#### 1"])


# -- QLoRA: configuration and error paths (4-bit loading itself needs a GPU) --------------------
QLORA = {"stage": "sft", "output_dir": "x", "data": {"train": "data/arith/sft_train.jsonl"},
         "model": {"name_or_path": "some/model", "quantization": {"load_in_4bit": True},
                   "lora": {"enabled": True}}}


def _qlora(**model):
    return load_recipe(None, data={**QLORA, "model": {**QLORA["model"], **model}})


def test_qlora_config_validation():
    recipe = _qlora()
    q = recipe.model.quantization
    assert (q.quant_type, q.compute_dtype, q.double_quant) == ("nf4", "bfloat16", True)
    with pytest.raises(AlignError, match="set model.lora.enabled: true"):
        _qlora(lora={"enabled": False})
    with pytest.raises(AlignError, match="needs a pretrained model"):
        _qlora(name_or_path="builtin:tiny")
    with pytest.raises(AlignError, match="quant_type"):
        _qlora(quantization={"load_in_4bit": True, "quant_type": "int4"})


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when not installed
    recipe = _qlora(name_or_path=str(REPO / "no-such-model"))
    with pytest.raises(AlignError, match=r"pip install bitsandbytes"):
        models.load_model(recipe.model, tokenizer=None)


def test_qlora_builds_the_qlora_papers_bnb_config(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    kwargs = models.quantization_kwargs(_qlora().model)
    bnb = kwargs["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": 0}
    with pytest.raises(AlignError, match="set model.lora.enabled"):
        models.quantization_kwargs(_qlora().model.__class__(name_or_path="some/model"))


def test_grpo_runs_on_a_gsm8k_shaped_file(tmp_path):
    """The GSM8K recipe's data spec and rewards through the GRPO stage (builtin tiny model, 1 step)."""
    from align.planning import run

    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"{a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n"
                            for a in range(4) for b in range(4)))
    spec = {"path": str(path), "columns": {"question": "prompt"}, "chat_prompt": "End with #### n"}
    recipe = load_recipe(None, data={
        "stage": "grpo", "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "builtin:tiny", "gradient_checkpointing": False},
        "data": {"train": spec, "max_length": 64},
        "grpo": {"num_generations": 4, "max_new_tokens": 6, "reward_funcs": ["math_answer", "math_format"],
                 "reward_weights": [1.0, 0.2], "plot": False},
        "train": {"max_steps": 1, "batch_size": 8, "mixed_precision": "no", "progress_bar": False}})
    run(recipe)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    step = next(r for r in logged if "train/reward" in r)
    assert "rewards/math_answer" in step and "rewards/math_format" in step
    assert step["train/reward"] == pytest.approx(step["rewards/math_answer"] + 0.2 * step["rewards/math_format"])


def test_qlora_preparation_on_a_stand_in_model():
    """The non-bitsandbytes half of the QLoRA path on CPU: a bf16 model flagged as 4-bit goes through
    PEFT's prepare_model_for_kbit_training (frozen base, fp32 norms/embeddings, checkpointing on) and
    LoRA; only the adapter gets gradients. (The 4-bit weights themselves need a GPU: not run here.)"""
    import torch

    from align import builtin
    from align.recipe import LoraConfig, ModelConfig

    tok = builtin.load_tokenizer()
    plain = ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16", gradient_checkpointing=False)
    model = models.load_model(plain, tok, trainable=True)
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes model
    cfg = ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16", gradient_checkpointing=True,
                      lora=LoraConfig(enabled=True, r=4, alpha=8.0))
    models._prepare_kbit(model, cfg)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.is_activation_checkpointing and model.config.use_cache is False
    model = models._wrap_lora(model, cfg, "causal_lm")
    ids = torch.tensor([tok("1+2=3")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
