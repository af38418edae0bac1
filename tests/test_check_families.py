"""`align check` on every family fixture (tests/families.py): the loss mask of a conversational sample in each
family's own template, pad == EOS flagged for reward models exactly where the family pads with EOS, and a
chat template whose generation prompt does not match training flagged as drift."""

from __future__ import annotations

import json

import pytest
from families import FAMILIES, SPECS

from align.check import check, render_tokens
from align.models import load_tokenizer
from align.recipe import ModelConfig

CONVERSATION = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."}]
# what each family trains in CONVERSATION: the reply and the template's end of turn (and what follows it)
TRAINED = {"llama": "It is 5.<|eot_id|>", "qwen2": "It is 5.<|im_end|>\n", "qwen3_moe": "It is 5.<|im_end|>\n",
           "mistral": " It is 5.</s>", "gemma2": "It is 5.<end_of_turn>\n", "phi3": "It is 5.<|end|>\n<|endoftext|>",
           "gpt2": " It is 5.<|endoftext|>"}


def _recipe(tmp_path, folder, stage, rows, **model):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"stage": stage, "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(folder), **model},
            "data": {"train": str(path), "max_length": 128}}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_loss_mask_of_a_conversation_in_each_familys_template(tmp_path, family_dir, name):
    report = check(None, data=_recipe(tmp_path, family_dir(name), "sft", [{"messages": CONVERSATION}]), print_fn=None)
    sample = report.samples[0]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(family_dir(name))))
    shown = render_tokens(tokenizer, sample["ids"], sample["trained"])
    trained = TRAINED[name].replace("\n", "\\n")  # render_tokens shows a newline as \n
    assert shown.endswith(f"⟦{trained}⟧") and shown.count("⟦") == 1, shown
    assert "What is 2+3?" in shown.split("⟦")[0]  # the user turn is shown, untrained
    assert "template_drift" not in report.codes() and "missing_eos" not in report.codes()


@pytest.mark.parametrize("name", FAMILIES)
def test_pad_equals_eos_is_flagged_for_reward_models_where_the_family_pads_with_eos(tmp_path, family_dir, name):
    pairs = [{"prompt": "What is 2+3?", "chosen": " 5", "rejected": " 6"}]
    report = check(None, data=_recipe(tmp_path, family_dir(name), "reward", pairs), print_fn=None)
    assert ("pad_equals_eos" in report.codes()) == SPECS[name].pad_is_eos


@pytest.mark.parametrize("layout", ["messages", "prompt_completion"])
def test_a_generation_prompt_that_does_not_match_training_is_drift(tmp_path, family_dir, layout):
    """ChatML whose generation prompt ends 'assistant' with TWO newlines where training renders one: a model
    prompted for generation would continue a prefix it never saw in training. Flagged (and `align train`
    refuses the rows) in both the messages and the prompt/completion layouts."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}")
    rows = ([{"messages": CONVERSATION + [{"role": "user", "content": "And 2+4?"},
                                          {"role": "assistant", "content": "It is 6."}]}] if layout == "messages"
            else [{"prompt": [CONVERSATION[0]], "completion": [CONVERSATION[1]]}])
    report = check(None, data=_recipe(tmp_path, family_dir("qwen2"), "sft", rows, chat_template=template),
                   print_fn=None)
    assert "template_drift" in report.codes()
    fixed = template.replace("assistant\\n\\n", "assistant\\n")
    report = check(None, data=_recipe(tmp_path, family_dir("qwen2"), "sft", rows, chat_template=fixed), print_fn=None)
    assert "template_drift" not in report.codes()
