"""Real data on the real-convention fixtures (tests/families.py): GSM8K and HH-RLHF through the stages.

GSM8K (`../shared/data/gsm8k-*.jsonl.gz`) goes through SFT as chat prompts (`columns: {question: prompt,
answer: completion}, chat_prompt: true`) and through GRPO with the `math_answer` and `math_format`
rewards; HH-RLHF (`hh-rlhf-harmless-base-test.jsonl.gz`, implicit-prompt transcripts) through SFT
(the chosen dialogues as text), a reward model, `align eval-rm` and DPO, long dialogues truncated.
Families chosen for their differing conventions: qwen2 (ChatML, no BOS, end of turn <|im_end|> + a
newline), llama (Llama 3: BOS, a pad token distinct from EOS, end of turn <|eot_id|>), gpt2 (no BOS,
pad == EOS, learned absolute positions capped at n_positions = 512, dropout 0.1 in its config).

CI runs a few optimizer steps per cell (the file takes about 30 s); the `slow` tests run each
pipeline at length (minutes) and assert that it learns:

    OMP_NUM_THREADS=1 python -m pytest -m slow tests/test_real_data.py -s
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from families import SPECS

from align import rewards
from align.accel import make_accelerator
from align.cli import main as cli_main
from align.data import IGNORE, encode_prompt, load_rows
from align.engine import train
from align.preference_data import split_implicit_prompt
from align.recipe import load_recipe
from align.stages import STAGES

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TRAIN, GSM8K_TEST = SHARED / "gsm8k-train.jsonl.gz", SHARED / "gsm8k-test.jsonl.gz"
HH = SHARED / "hh-rlhf-harmless-base-test.jsonl.gz"  # 2,312 pairs; the tests train on the start, hold out the end
HH_HELD_OUT = "test[2248:]"  # the last 64 pairs

pytestmark = pytest.mark.skipif(not (GSM8K_TRAIN.is_file() and HH.is_file()),
                                reason="../shared/data (GSM8K, HH-RLHF) not present")

END_OF_TURN = {  # what a chat template puts after the assistant's answer: trained with it
    "qwen2": "<|im_end|>\n",
    "llama": "<|eot_id|>",
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def gsm8k(path: Path, split: str, *, answer_as_completion: bool) -> dict:
    """A GSM8K data spec: the question as a chat prompt; the answer the SFT completion or the reward reference."""
    columns = {"question": "prompt", "answer": "completion"} if answer_as_completion else {"question": "prompt"}
    return {"path": str(path), "split": split, "columns": columns, "chat_prompt": True}


def make_recipe(stage: str, model: Path, out: Path, **sections) -> dict:
    recipe = {"stage": stage, "output_dir": str(out), "seed": 0, "model": {"name_or_path": str(model)},
              "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "lr_scheduler": "constant", "save_steps": 1000,
                        "log_steps": 1, "progress_bar": False, "mixed_precision": "no"},
              "eval": {"generate": False}}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def build_stage(recipe: dict):
    """The stage of a recipe dict, built as `align train` builds it (to look at its data before training)."""
    from accelerate.utils import set_seed

    recipe = load_recipe(None, data=recipe)
    accelerator = make_accelerator(recipe.train, recipe.output_dir)
    set_seed(recipe.seed)
    return STAGES[recipe.stage].cls(recipe, accelerator), recipe, accelerator


def run_stage(recipe: dict) -> tuple[dict, list[dict]]:
    """Train a recipe dict; (metrics.json, log.jsonl records)."""
    stage, recipe, accelerator = build_stage(recipe)
    return train(stage, recipe, accelerator), read_log(recipe.output_dir)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if line.strip()]


def series(log: list[dict], name: str) -> list[float]:
    return [r[name] for r in log if name in r]


def read_rows(path: Path, split: str) -> list[dict]:
    return load_rows({"path": str(path), "split": split}).rows


def samples_of(packed_row: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sample in a packed SFT row (position_ids restart at 0 for each)."""
    starts = [i for i, p in enumerate(packed_row["position_ids"]) if p == 0] + [len(packed_row["input_ids"])]
    return [(packed_row["input_ids"][a:b], packed_row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def summary_counts(text: str, key: str) -> dict[str, int]:
    """The numbers of a preference set's summary line (`PreferenceSet.summary`) that `key` printed."""
    line = next(line for line in text.splitlines() if line.startswith(f"{key}: ") and "pairs kept" in line)
    return {what: int(n) for n, what in
            re.findall(r"(\d+) (pairs kept|dropped as identical|with no completion|truncated)", line)}


# ---------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------
def test_every_gsm8k_reference_states_its_answer_as_the_format_reward_asks():
    """The rewards read the real answers: every GSM8K solution (train and test) ends with `#### <number>`
    (math_format 1) and scores math_answer 1 against itself, so the format GRPO rewards is the one SFT teaches."""
    for path in (GSM8K_TRAIN, GSM8K_TEST):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            answers = [json.loads(line)["answer"] for line in handle]
        assert len(answers) in (7473, 1319)
        assert rewards.math_format(None, answers) == [1.0] * len(answers)
        assert rewards.math_answer(None, answers, answer=answers) == [1.0] * len(answers)
        assert all(rewards.final_number(a) == a.rsplit("####", 1)[1].strip().replace(",", "") for a in answers)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gsm8k_sft_with_chat_prompts_trains_the_answer_and_its_end_of_turn(family_dir, family, tmp_path):
    model = family_dir(family)
    recipe = make_recipe("sft", model, tmp_path / "sft",
                         data={"train": gsm8k(GSM8K_TRAIN, "train[:48]", answer_as_completion=True),
                               "eval": gsm8k(GSM8K_TEST, "test[:16]", answer_as_completion=True),
                               "max_length": 512},
                         train={"max_steps": 6, "batch_size": 4})
    stage, parsed, accelerator = build_stage(recipe)
    tokenizer = stage.tokenizer
    rows = load_rows(recipe["data"]["train"]).rows
    by_prompt = {tuple(encode_prompt(tokenizer, r["prompt"])): r for r in rows}
    samples = [s for row in stage.batches.examples for s in samples_of(row)]  # packed rows (the default)
    assert len(samples) == len(rows) == 48
    end = END_OF_TURN[family]
    for ids, labels in samples:
        trained = [i for i, label in enumerate(labels) if label != IGNORE]
        prompt = tuple(ids[: trained[0]])
        assert prompt in by_prompt, "the untrained head of a sample is not a chat-templated question"
        row = by_prompt[prompt]
        assert trained == list(range(trained[0], len(ids))), "every token after the prompt is trained"
        assert [labels[i] for i in trained] == ids[trained[0]:]
        text = tokenizer.decode([ids[i] for i in trained])
        if len(ids) < 512:
            assert text == row["completion"][0]["content"] + end
        else:  # truncated at data.max_length: the answer's beginning
            assert (row["completion"][0]["content"] + end).startswith(text)
    # the chat template of the family wraps the question (ChatML's default system turn; Llama 3's BOS)
    first = tokenizer.decode(samples[0][0][:12])
    assert first.startswith({"qwen2": "<|im_start|>system", "llama": "<|begin_of_text|><|start_header_id|>user"}[family])

    metrics = train(stage, parsed, accelerator)
    losses = series(read_log(parsed.output_dir), "train/loss")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert metrics["eval/loss"] < metrics["eval/loss_start"] - 0.3


def test_gsm8k_grpo_logs_math_answer_and_format_rewards(family_dir, tmp_path):
    model = family_dir("qwen2")
    recipe = make_recipe("grpo", model, tmp_path / "grpo",
                         data={"train": gsm8k(GSM8K_TRAIN, "train[:16]", answer_as_completion=False),
                               "eval": gsm8k(GSM8K_TEST, "test[:4]", answer_as_completion=False), "max_length": 512},
                         grpo={"num_generations": 4, "max_new_tokens": 24, "reward_funcs": ["math_answer", "math_format"],
                               "reward_weights": [1.0, 0.5], "accuracy": "math_answer", "plot": False},
                         train={"max_steps": 3, "batch_size": 8},
                         eval={"generate": True, "max_new_tokens": 24})
    stage, parsed, accelerator = build_stage(recipe)
    prompt = stage.tokenizer.decode(stage.prompts.prompt_ids[0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert stage.prompts.rows[0]["answer"].rstrip().split("\n")[-1].startswith("####")  # the reference, as math_answer reads it
    metrics = train(stage, parsed, accelerator)
    steps = [r for r in read_log(parsed.output_dir) if "train/reward" in r]
    assert len(steps) == 3
    for r in steps:
        assert 0.0 <= r["rewards/math_answer"] <= 1.0 and 0.0 <= r["rewards/math_format"] <= 1.0
        assert r["train/reward"] == pytest.approx(r["rewards/math_answer"] + 0.5 * r["rewards/math_format"])
    assert {"eval/reward", "eval/task_accuracy", "eval/reward_start"} <= set(metrics)


# ---------------------------------------------------------------------------
# HH-RLHF
# ---------------------------------------------------------------------------
def test_hh_sft_on_chosen_dialogues_cuts_long_ones_at_gpt2_positions(family_dir, tmp_path, capsys):
    """SFT on the chosen transcripts as text (`columns: {chosen: text}`) with GPT-2's 512 positions:
    dialogues longer than data.max_length keep their beginning (data.truncation: keep_start), counted."""
    model = family_dir("gpt2")
    recipe = make_recipe("sft", model, tmp_path / "sft",
                         data={"train": {"path": str(HH), "split": "test[:80]", "columns": {"chosen": "text"}},
                               "eval": {"path": str(HH), "split": HH_HELD_OUT, "columns": {"chosen": "text"}},
                               "max_length": 512, "eval_limit": 16},
                         train={"max_steps": 4, "batch_size": 2})
    stage, parsed, accelerator = build_stage(recipe)
    tokenizer = stage.tokenizer
    full = [tokenizer(r["chosen"])["input_ids"] + [tokenizer.eos_token_id] for r in read_rows(HH, "test[:80]")]
    long = [ids for ids in full if len(ids) > 512]
    assert 4 <= len(long) < 20  # real dialogues: a few are longer than GPT-2's window
    assert f"0 samples dropped (no trainable token within data.max_length=512), {len(long)} truncated" in \
        capsys.readouterr().out
    samples = [ids for row in stage.batches.examples for ids, _ in samples_of(row)]
    assert sorted(map(len, samples)) == sorted(min(len(ids), 512) for ids in full)
    assert sorted(ids for ids in samples if len(ids) == 512) == sorted(ids[:512] for ids in long)
    metrics = train(stage, parsed, accelerator)
    losses = series(read_log(parsed.output_dir), "train/loss")
    assert losses[-1] < losses[0] - 0.3, losses
    assert metrics["eval/loss"] < metrics["eval/loss_start"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hh_reward_model_and_eval_rm_on_held_out_pairs(family_dir, family, tmp_path, capsys):
    """A reward model on HH-RLHF pairs cut to 512 tokens (GPT-2's whole window), read at the last real token
    (llama's pad is its own token, GPT-2's is EOS), then `align eval-rm` on the held-out pairs: the JSON
    report agrees with the stage's last eval."""
    model = family_dir(family)
    out = tmp_path / "rm"
    recipe = make_recipe("reward", model, out,
                         data={"train": {"path": str(HH), "split": "test[:64]"},
                               "eval": {"path": str(HH), "split": HH_HELD_OUT}, "max_length": 512},
                         train={"lr": 1e-3})
    metrics, log = run_stage(recipe)
    train_counts = summary_counts(capsys.readouterr().out, "data.train")
    assert train_counts["pairs kept"] == 64 and train_counts["truncated"] > 0
    assert len(series(log, "train/loss")) == 4 and "eval/pair_accuracy_start" in metrics
    report = tmp_path / "eval-rm.json"
    assert cli_main(["eval-rm", "--model", str(out), "--data", str(HH), "--split", HH_HELD_OUT,
                     "--max-length", "512", "--output", str(report)]) == 0
    summary = json.loads(report.read_text())
    assert {"accuracy", "n", "ties", "mean_margin"} <= set(summary)
    assert summary["n"] + summary["dropped_identical"] + summary["dropped_empty"] == 64
    assert summary["truncated"] > 0 and summary["ties"] == 0
    # the same pairs, cut the same way, scored by the same model: eval-rm agrees with the stage's last eval
    assert summary["n"] == metrics["eval/pairs"]
    assert summary["accuracy"] == pytest.approx(metrics["eval/pair_accuracy"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hh_dpo_splits_implicit_prompts_and_cuts_long_dialogues_from_the_start(family_dir, family, tmp_path, capsys):
    """DPO on HH-RLHF transcripts: each pair split into the shared prompt (up to the last 'Assistant:') and
    the two answers; a pair longer than data.max_length loses the BEGINNING of its prompt (data.prompt_truncation:
    keep_end, the default) and keeps a leading BOS (llama; qwen2 has none)."""
    model = family_dir(family)
    recipe = make_recipe("dpo", model, tmp_path / "dpo",
                         data={"train": {"path": str(HH), "split": "test[:32]"},
                               "eval": {"path": str(HH), "split": HH_HELD_OUT}, "max_length": 256, "eval_limit": 16},
                         train={"max_steps": 3, "lr": 1e-3})
    stage, parsed, accelerator = build_stage(recipe)
    tokenizer = stage.tokenizer
    head = [tokenizer.bos_token_id] if SPECS[family].adds_bos else []
    rows = read_rows(HH, "test[:32]")
    assert len(stage.examples) == len(rows) == 32  # no pair dropped: the kept end leaves room for the answers
    truncated = 0
    for row, example in zip(rows, stage.examples):
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        assert prompt.endswith("\n\nAssistant:") and row["chosen"] == prompt + chosen  # shared prompt + answers
        full_prompt = tokenizer(prompt)["input_ids"]
        chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kept = example["prompt_ids"]
        body = kept[len(head):]
        assert kept[: len(head)] == head and full_prompt[len(full_prompt) - len(body):] == body  # [BOS +] its END
        assert example["chosen_ids"] == chosen_ids[: len(example["chosen_ids"])]
        assert example["rejected_ids"] == rejected_ids[: len(example["rejected_ids"])]
        cut = len(full_prompt) + max(len(chosen_ids), len(rejected_ids)) > 256
        truncated += cut
        assert len(kept) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= 256
        if len(kept) < len(full_prompt):
            # cut from the beginning: the dialogue's first turns are gone, its last 'Assistant:' turn is kept
            text = tokenizer.decode(body)
            assert prompt.endswith(text) and len(text) < len(prompt) and text.endswith("\n\nAssistant:")
    assert truncated >= 5
    counts = summary_counts(capsys.readouterr().out, "data.train")
    assert counts == {"pairs kept": 32, "dropped as identical": 0, "with no completion": 0, "truncated": truncated}
    metrics = train(stage, parsed, accelerator)
    logged = [r for r in read_log(parsed.output_dir) if "rewards/margins" in r]
    assert len(logged) == 3 and all("logps/chosen" in r for r in logged)
    assert {"eval/pair_accuracy", "eval/loss", "eval/rewards/margins"} <= set(metrics)


def test_families_under_test_have_the_conventions_the_file_relies_on():
    assert SPECS["gpt2"].arch["n_positions"] == 512 and SPECS["gpt2"].pad_is_eos and not SPECS["gpt2"].adds_bos
    assert SPECS["llama"].adds_bos and not SPECS["llama"].pad_is_eos
    assert not SPECS["qwen2"].adds_bos and SPECS["qwen2"].eos == "<|im_end|>"


# ---------------------------------------------------------------------------
# at length (pytest -m slow): each pipeline learns on real data
# ---------------------------------------------------------------------------
def _figures(name: str, values: dict) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))


@pytest.fixture(scope="module")
def gsm8k_sft_at_length(family_dir, tmp_path_factory):
    """qwen2 SFT on the first 4,000 GSM8K solutions as chat replies (packed rows of 512), 300 steps: the
    GSM8K SFT at length, and the start GRPO trains from (about 2 minutes on 2 loaded cores)."""
    out = tmp_path_factory.mktemp("gsm8k") / "sft"
    recipe = make_recipe("sft", family_dir("qwen2"), out,
                         data={"train": gsm8k(GSM8K_TRAIN, "train[:4000]", answer_as_completion=True),
                               "eval": gsm8k(GSM8K_TEST, "test[:200]", answer_as_completion=True),
                               "max_length": 512},
                         train={"max_steps": 300, "batch_size": 8, "lr": 3e-3, "lr_scheduler": "cosine",
                                "warmup_steps": 20, "log_steps": 25},
                         eval={"steps": 100})
    metrics, log = run_stage(recipe)
    return out, metrics, log


@pytest.mark.slow
def test_gsm8k_sft_at_length_lowers_the_held_out_loss(gsm8k_sft_at_length):
    _, metrics, log = gsm8k_sft_at_length
    evals = series(log, "eval/loss")  # steps 0, 100, 200, 300 on 200 test solutions
    _figures("gsm8k sft qwen2", {"eval/loss by 100 steps": " -> ".join(f"{v:.3f}" for v in evals)})
    assert len(evals) == 4 and all(b < a for a, b in zip(evals, evals[1:])), evals
    # measured 7.77 -> 4.19 -> 3.84 -> 3.79 (uniform over the 1,203 tokens would be 7.09)
    assert metrics["eval/loss"] < metrics["eval/loss_start"] - 3.0


@pytest.mark.slow
def test_gsm8k_grpo_at_length_raises_the_format_reward(gsm8k_sft_at_length, tmp_path):
    """GRPO from the SFT start on GSM8K questions it did not see (train[4000:]), rewards math_answer +
    math_format, 8 prompts x G = 8 a step, 40 steps (about 1.5 minutes): the share of completions that end
    with `#### <number>` rises from a few percent to most of them."""
    start, _, _ = gsm8k_sft_at_length
    recipe = make_recipe("grpo", start, tmp_path / "grpo",
                         data={"train": gsm8k(GSM8K_TRAIN, "train[4000:]", answer_as_completion=False),
                               "eval": gsm8k(GSM8K_TEST, "test[:64]", answer_as_completion=False),
                               "max_length": 512},
                         grpo={"num_generations": 8, "max_new_tokens": 200, "temperature": 1.0,
                               "reward_funcs": ["math_answer", "math_format"], "accuracy": "math_answer",
                               "generation_batch_size": 64, "plot": False},
                         train={"max_steps": 40, "batch_size": 64, "lr": 1e-3},
                         eval={"generate": True, "max_new_tokens": 200, "batch_size": 64})
    metrics, log = run_stage(recipe)
    fmt = series(log, "rewards/math_format")
    first, last = sum(fmt[:5]) / 5, sum(fmt[-5:]) / 5
    lengths = series(log, "train/completion_length")
    answer = series(log, "rewards/math_answer")
    _figures("gsm8k grpo qwen2", {
        "rewards/math_format (mean of steps 1-5)": first, "rewards/math_format (steps 36-40)": last,
        "rewards/math_answer (steps 1-5)": sum(answer[:5]) / 5, "rewards/math_answer (steps 36-40)": sum(answer[-5:]) / 5,
        "train/completion_length (step 1)": lengths[0], "train/completion_length (step 40)": lengths[-1],
        "eval/reward_start (greedy, 64 test questions)": metrics["eval/reward_start"], "eval/reward": metrics["eval/reward"],
        "eval/task_accuracy_start": metrics["eval/task_accuracy_start"], "eval/task_accuracy": metrics["eval/task_accuracy"]})
    assert len(fmt) == 40
    # measured 0.034 -> 0.94 (per step 0.016 ... 0.95); the answers stay wrong: a 2-layer, 32-wide model
    # learns the format, not the arithmetic, and its completions shrink to little more than `#### <n>`
    assert last > first + 0.5, fmt


@pytest.mark.slow
def test_hh_reward_model_at_length_beats_chance_on_held_out_pairs(family_dir, tmp_path):
    """A reward model on 1,800 HH-RLHF pairs, 512 held out, cut to 512 tokens (keep_end), then `align eval-rm`
    (about 1.5 minutes)."""
    out = tmp_path / "rm"
    recipe = make_recipe("reward", family_dir("llama"), out,
                         data={"train": {"path": str(HH), "split": "test[:1800]"},
                               "eval": {"path": str(HH), "split": "test[1800:]"}, "max_length": 512},
                         train={"max_steps": 300, "batch_size": 16, "lr": 3e-3, "lr_scheduler": "cosine",
                                "warmup_steps": 20, "log_steps": 25},
                         eval={"steps": 100, "batch_size": 64})
    metrics, _ = run_stage(recipe)
    report = tmp_path / "eval-rm.json"
    assert cli_main(["eval-rm", "--model", str(out), "--data", str(HH), "--split", "test[1800:]",
                     "--max-length", "512", "--output", str(report)]) == 0
    summary = json.loads(report.read_text())
    _figures("hh reward llama", {key: summary[key] for key in ("accuracy", "n", "ties", "mean_margin", "truncated",
                                                                 "longer_wins", "chosen_longer")}
             | {"eval/pair_accuracy_start": metrics["eval/pair_accuracy_start"]})
    assert summary["n"] == 512 and summary["accuracy"] == pytest.approx(metrics["eval/pair_accuracy"])
    # measured 0.588 (0.48 before training; 0.609, 0.611 at steps 100, 200). Chance is 0.5 and one standard
    # error at n = 512 is 0.022: above 0.55 is above chance at p < 0.02 (one-sided binomial), and leaves 19 pairs
    # of slack for another CPU's rounding. (Preferring the shorter answer scores 0.575 here; this model's
    # longer_wins 0.36 says it learned much of that.)
    assert summary["accuracy"] > 0.55, summary
