"""`align check`: the silent-failure warnings, the loss-mask display, and the memory estimate
against the peak memory of real CPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from align import builtin
from align.check import check, read_launch, render_tokens
from align.cli import main
from align.data import IGNORE, Rows, tokenize_sft
from tests.helpers import REPO, tiny_sft_recipe


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def run_check(recipe: dict, **kwargs):
    return check(None, data=recipe, print_fn=None, **kwargs)


def sft_recipe(tmp_path, rows, **overrides):
    recipe = tiny_sft_recipe(tmp_path / "out", **overrides)
    recipe["data"]["train"] = write_jsonl(tmp_path / "train.jsonl", rows)
    return recipe


def pair_recipe(tmp_path, rows, stage="reward", **overrides):
    recipe = sft_recipe(tmp_path, rows, **overrides)
    recipe["stage"] = stage
    return recipe


ARITH = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 34), (5, 70), (61, 91), (8, 8)]]


# ---------------------------------------------------------------------------
# the loss mask, token by token
# ---------------------------------------------------------------------------
def test_mask_highlight_is_right_token_by_token(tmp_path):
    """The printed row wraps exactly the tokens whose label is trained (as tokenize_sft builds them)."""
    rows = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                          {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]}]
    report = run_check(sft_recipe(tmp_path, rows))
    tokenizer = builtin.load_tokenizer()
    expected = tokenize_sft(Rows(rows, [("x", 1)]), tokenizer, max_length=32, truncation="keep_start",
                            key="data.train").examples[0]
    sample = report.samples[0]
    assert sample["ids"] == expected["input_ids"]
    assert sample["trained"] == [label != IGNORE for label in expected["labels"]]
    # both assistant turns (answer + EOS) trained, nothing else: "<bos><|user|>1+2=<|assistant|>⟦3<eos>⟧<|user|>…"
    shown = render_tokens(tokenizer, sample["ids"], sample["trained"])
    assert shown == "<bos><|user|>1+2=<|assistant|>⟦3<eos>⟧<|user|>2+2=<|assistant|>⟦4<eos>⟧"
    # the rendering follows the mask token by token: flip one token and only it moves
    flipped = list(sample["trained"])
    flipped[-1] = False
    assert render_tokens(tokenizer, sample["ids"], flipped).endswith("⟦4⟧<eos>")
    assert any("⟦3<eos>⟧" in line for line in report.lines)


def test_clean_recipe_has_no_warnings(tmp_path):
    report = run_check(sft_recipe(tmp_path, ARITH))
    assert report.warnings == []
    assert report.estimate is not None and report.estimate.peak > 0


# ---------------------------------------------------------------------------
# each silent failure fires on a crafted input
# ---------------------------------------------------------------------------
def test_no_trainable_tokens(tmp_path):
    """Prompts longer than max_length leave no answer token when only ends are cut (keep_start); the default
    keep_end cuts the prompt's beginning instead and keeps the answers (what the stage does too)."""
    rows = [{"prompt": "1" * 40, "completion": "2"}] * 3 + ARITH
    report = run_check(sft_recipe(tmp_path, rows, **{"data.max_length": 32, "data.prompt_truncation": "keep_start"}))
    assert "no_trainable_tokens" in report.codes()
    assert "3 of 7" in next(w.message for w in report.warnings if w.code == "no_trainable_tokens")
    assert "no_trainable_tokens" not in run_check(sft_recipe(tmp_path, rows, **{"data.max_length": 32})).codes()


def test_duplicated_bos(tmp_path):
    rows = [{"text": "<bos>12+34=46"}] + [{"text": f"{a}+{b}={a + b}"} for a, b in [(1, 2), (3, 4)]]
    report = run_check(sft_recipe(tmp_path, rows))
    assert "duplicated_bos" in report.codes()
    assert "1 of 3" in next(w.message for w in report.warnings if w.code == "duplicated_bos")


def test_pad_equals_eos_on_a_reward_model(tmp_path):
    tokenizer = builtin.load_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    from transformers import AutoConfig

    builtin.model_config("builtin:tiny", tokenizer).save_pretrained(folder)
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}] * 4
    report = run_check(pair_recipe(tmp_path, rows, **{"model.name_or_path": str(folder)}))
    assert "pad_equals_eos" in report.codes()
    assert AutoConfig.from_pretrained(folder).hidden_size == 128
    # the same tokenizer on an SFT run is fine (no score read at the last token)
    assert "pad_equals_eos" not in run_check(sft_recipe(tmp_path, ARITH, **{"model.name_or_path": str(folder)})).codes()


DRIFTING_TEMPLATE = (  # renders the generation prompt with a trailing space that the full rendering lacks
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def test_template_drift_between_prompt_and_chosen(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+2="}], "chosen": [{"role": "assistant", "content": "3"}],
             "rejected": [{"role": "assistant", "content": "4"}]}]
    report = run_check(pair_recipe(tmp_path, rows, stage="dpo", **{"model.chat_template": DRIFTING_TEMPLATE}))
    assert "template_drift" in report.codes()
    assert "template_drift" not in run_check(pair_recipe(tmp_path, rows, stage="dpo")).codes()


def test_missing_eos(tmp_path):
    # a template that closes assistant turns with a newline, not EOS: the model never learns to stop
    template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}] * 2
    report = run_check(sft_recipe(tmp_path, rows, **{"model.chat_template": template}))
    assert "missing_eos" in report.codes()
    assert "missing_eos" not in run_check(sft_recipe(tmp_path, rows)).codes()
    # EOS then a newline closing the turn (Qwen's `<|im_end|>\n` when EOS is <|im_end|>) still trains the stop
    closing = template.replace("{{ '\\n' }}", "{{ eos_token + '\\n' }}")
    assert closing != template
    assert "missing_eos" not in run_check(sft_recipe(tmp_path, rows, **{"model.chat_template": closing})).codes()


def test_max_length_cutting_most_samples(tmp_path):
    rows = [{"prompt": "12+34=", "completion": "4" * 30}] * 5 + ARITH
    report = run_check(sft_recipe(tmp_path, rows, **{"data.max_length": 20}))
    assert "max_length" in report.codes() and "no_trainable_tokens" not in report.codes()
    assert "max_length" not in run_check(sft_recipe(tmp_path, rows, **{"data.max_length": 64})).codes()


def test_memory_over_the_gpu_warns(tmp_path):
    report = run_check(sft_recipe(tmp_path, ARITH), gpu_memory=0.01)
    assert "memory" in report.codes()


# ---------------------------------------------------------------------------
# launch configs, real-scale recipes, the command line
# ---------------------------------------------------------------------------
def test_launch_configs_read_as_their_names_say():
    launch = REPO / "launch"
    assert read_launch(launch / "single_gpu.yaml").kind == "single"
    assert read_launch(launch / "multi_gpu.yaml").kind == "ddp"
    z2 = read_launch(launch / "zero2.yaml")
    assert (z2.zero_stage, z2.shard_grads, z2.shard_weights) == (2, True, False)
    z3o = read_launch(launch / "zero3_offload.yaml")
    assert z3o.shard_weights and z3o.offload_weights and z3o.offload_optimizer
    fsdp = read_launch(launch / "fsdp2.yaml", nodes=2)
    assert fsdp.kind == "fsdp" and fsdp.shard_weights and fsdp.processes == 16


QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_real_recipes_without_the_hub(tmp_path, capsys):
    """Hub ids: schema validated, data and estimate skipped with a message; --model-config gives the estimate,
    and sharding shrinks it in the order ZeRO-0 > ZeRO-2 > ZeRO-3 > ZeRO-3 offload."""
    recipe = str(REPO / "recipes/qwen2.5-0.5b/sft.yaml")
    assert main(["check", recipe, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate skipped" in out and "data checks skipped" in out
    config = tmp_path / "config.json"
    config.write_text(json.dumps(QWEN_05B))
    peaks = []
    for launch in ("multi_gpu", "zero2", "zero3", "zero3_offload"):  # like for like: full logits everywhere
        report = check(recipe, ["model.chunked_logprobs=false"], launch=str(REPO / f"launch/{launch}.yaml"),
                       model_config=str(config), print_fn=None)
        peaks.append(report.estimate.peak)
        if launch == "zero3":  # 494M parameters in bf16, sharded over 8 GPUs
            assert 494e6 * 2 / 8 == pytest.approx(report.estimate.parts["weights"], rel=0.01)
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4
    # chunked log-probs (the default) leave one chunk's logits; ZeRO-3 partitions lm_head: the full logits
    ddp, zero3 = (check(recipe, launch=str(REPO / f"launch/{launch}.yaml"), model_config=str(config),
                        print_fn=None).estimate for launch in ("multi_gpu", "zero3"))
    chunked = next(k for k in ddp.parts if k.startswith("logits (chunked"))
    assert ddp.parts[chunked] < 0.05 * zero3.parts["logits (fp32 log-softmax + gradient)"]
    assert ddp.peak < peaks[0] and any(n.startswith("largest term: ") for n in ddp.notes)
    assert main(["check", str(REPO / "recipes/qwen2.5-0.5b/dpo-lora.yaml"), "--model-config", str(config)]) == 0
    assert "LoRA" in capsys.readouterr().out


def test_every_recipe_checks(capsys):
    """Every LLM recipe shipped (tiny, pipeline, real-scale) checks offline with exit 0."""
    paths = [p for p in sorted((REPO / "recipes").rglob("*.yaml")) if p.parent.name != "rl"]
    assert len(paths) > 15
    for path in paths:
        assert main(["check", str(path), "--rows", "1", "--sample", "50", "--color", "never"]) == 0, path
    assert "no warnings" in capsys.readouterr().out


def test_data_made_at_run_time_is_not_required(tmp_path):
    missing = str(tmp_path / "pairs.jsonl")
    recipe = pair_recipe(tmp_path, ARITH)
    recipe["data"].update(train=missing, from_policy={
        "policy": "builtin:tiny", "train": {"prompts": str(REPO / "data/arith/sft_train.jsonl"), "output": missing}})
    report = run_check(recipe)
    assert any("made at run time by data.from_policy" in line for line in report.lines)
    assert report.estimate is not None


def test_strict_exits_1_on_a_warning(tmp_path, capsys):
    import yaml

    recipe = sft_recipe(tmp_path, [{"text": "<bos>1+2=3"}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["check", str(path), "--color", "never"]) == 0
    assert main(["check", str(path), "--strict", "--color", "never"]) == 1
    assert "[duplicated_bos]" in capsys.readouterr().out


def test_bad_recipe_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\noutput_dir: x\ndata: {train: data/arith/sft_train.jsonl}\ntrain: {lrr: 1}\n")
    assert main(["check", str(bad)]) == 2
    assert "train.lr" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the estimate against measured peak memory (CPU, fp32, one process)
# ---------------------------------------------------------------------------
MEASURE = r"""
import gc, json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from align import builtin
from align.planning import run
from align.recipe import load_recipe

builtin.MODEL_CONFIGS["m50"] = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=8)
builtin.MODEL_CONFIGS["v152k"] = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
_config = builtin.model_config
VOCAB = {"builtin:m50": 32000, "builtin:v152k": 151936}  # real LM heads (Llama 2's; Qwen 2.5's)
def model_config(name, tokenizer, **kw):
    c = _config(name, tokenizer, **kw)
    c.vocab_size = VOCAB.get(name, c.vocab_size)
    return c
builtin.model_config = model_config

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

recipes = json.loads(sys.argv[1])
from align.stages import STAGES
for spec in recipes:
    STAGES[spec["stage"]].cls  # import every stage's modules before measuring
for spec in recipes[:1]:  # warm-up: kernels, allocator arenas, lazy imports, on a 1-row step
    warm = json.loads(json.dumps(spec))
    warm["output_dir"] += "-warm"
    warm["train"].update(max_steps=1, batch_size=(warm.get("grpo") or {}).get("num_generations", 1))
    run(load_recipe(None, data=warm))
out = []
for spec in recipes:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
    base = status("VmRSS")
    run(load_recipe(None, data=spec))
    out.append(status("VmHWM") - base)
print("MEASURED", json.dumps(out))
"""


def measure(recipes: list[dict]) -> list[float]:
    """Peak resident bytes each run adds, measured in a fresh child process.

    glibc's mmap threshold is fixed at 64 KiB so that every tensor buffer is its own
    mapping, returned to the system when freed: the resident set then follows live
    tensor memory, as a GPU allocator's allocated bytes do (with the default adaptive
    threshold freed buffers stay in the heap and the peak reads up to 1.6x higher).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(recipes)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MEASURED"))
    return json.loads(line.split(" ", 1)[1])


def long_rows(n=32):
    """Rows of 252 tokens (BOS, 100-character prompt, 150-character answer, EOS): activations dominate."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice("abcdefghij ") for _ in range(100))
        answer = "".join(rng.choice("abcdefghij ") for _ in range(150))
        rows.append({"prompt": prompt, "completion": answer, "chosen": answer, "rejected": answer[::-1]})
    return rows


def memory_recipes(tmp_path, model: str, batch_size: int, steps: int,
                   stages=("sft", "reward", "dpo")) -> list[dict]:
    data = write_jsonl(tmp_path / "long.jsonl", long_rows())
    # checkpointing as on a GPU (what the estimate models; `auto` turns it off on a CPU)
    common = {"model": {"name_or_path": model, "gradient_checkpointing": True}, "seed": 0,
              "data": {"train": data, "max_length": 256},
              "train": {"max_steps": steps, "batch_size": batch_size, "lr": 1e-4, "mixed_precision": "no",
                        "save_steps": 1000, "log_steps": 1, "progress_bar": False},
              "eval": {"generate": False}}
    return [dict(common, stage=stage, output_dir=str(tmp_path / stage)) for stage in stages]


def compare(tmp_path, recipes, model_config=None):
    measured = measure(recipes)
    rows = []
    for recipe, got in zip(recipes, measured):
        est = run_check(recipe, model_config=model_config).estimate
        rows.append((recipe["stage"], est.peak / 2**20, got / 2**20))
        print(f"{recipe['model']['name_or_path']} {recipe['stage']}: estimated {est.peak / 2**20:.0f} MiB, "
              f"measured {got / 2**20:.0f} MiB added, ratio {est.peak / got:.2f}")
    for stage, est, got in rows:
        assert abs(est - got) <= 0.2 * got, (stage, est, got)
    return rows


def test_estimate_matches_measured_peak_tiny(tmp_path):
    """CI: the tiny model (1.05M parameters), rows of 252 tokens, SFT and reward (slow: DPO too, and 50M)."""
    compare(tmp_path, memory_recipes(tmp_path, "builtin:tiny", batch_size=16, steps=2, stages=("sft", "reward")))


@pytest.mark.slow
def test_estimate_matches_measured_peak_50m(tmp_path):
    """A 50M-parameter Llama with a 32,000-token vocabulary: SFT, reward, DPO; and the tiny model's DPO."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "m50")
    compare(tmp_path, memory_recipes(tmp_path, "builtin:m50", batch_size=4, steps=2),
            model_config=str(tmp_path / "m50"))
    (tmp_path / "tiny").mkdir()
    compare(tmp_path / "tiny", memory_recipes(tmp_path / "tiny", "builtin:tiny", batch_size=16, steps=2,
                                              stages=("dpo",)))


@pytest.mark.slow
def test_estimate_matches_measured_peak_real_vocabulary(tmp_path):
    """Qwen 2.5's vocabulary (151,936) on a 2-layer model, 2 rows of 1,000 tokens: the logits dominate. Chunked
    (the default) SFT and DPO, and SFT on the plain path (the full logits, ~20x more)."""
    import random

    from transformers import LlamaConfig

    rng = random.Random(0)
    text = lambda n: "".join(rng.choice("abcdefghij ") for _ in range(n))  # noqa: E731
    rows = [{"prompt": text(398), "completion": text(600), "chosen": text(600), "rejected": text(600)}
            for _ in range(8)]
    recipes = memory_recipes(tmp_path, "builtin:v152k", batch_size=2, steps=2, stages=("sft", "dpo", "sft"))
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    for recipe in recipes:
        recipe["data"] = {"train": data, "max_length": 1000}
    recipes[2] = dict(recipes[2], output_dir=str(tmp_path / "sft-plain"),
                      model=dict(recipes[2]["model"], chunked_logprobs=False))
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "v152k")
    compare(tmp_path, recipes, model_config=str(tmp_path / "v152k"))


@pytest.mark.slow
def test_estimate_matches_measured_peak_grpo(tmp_path):
    """GRPO with a frozen reference (kl_coef > 0): generation of 150 tokens, then training on 251-token rows."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in long_rows()])
    recipe = {"stage": "grpo", "output_dir": str(tmp_path / "grpo"), "seed": 0,
              # checkpointing as on a GPU (what the estimate models; `auto` turns it off on a CPU)
              "model": {"name_or_path": "builtin:tiny", "gradient_checkpointing": True},
              "data": {"train": data, "max_length": 256},
              "grpo": {"num_generations": 4, "max_new_tokens": 150, "kl_coef": 0.1, "reward_funcs": ["length"],
                       "eval_kl_prompts": 0},
              "train": {"max_steps": 2, "batch_size": 16, "lr": 1e-4, "mixed_precision": "no", "save_steps": 1000,
                        "log_steps": 1, "progress_bar": False},
              "eval": {"generate": False}}
    compare(tmp_path, [recipe])
