"""The model folders of tests/families.py: they load the ways users load them, carry their family's
conventions, and build to the same bytes in any process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from families import DROPOUT_KEYS, FAMILIES, SPECS
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import models
from align.data import Rows, tokenize_sft
from align.recipe import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = "Natalia sold clips to 48 of her friends in April.\n\nHuman: Why?\n\nAssistant: 2+3=<<2+3=5>>5 #### 5"
HI = [{"role": "user", "content": "Hi"}]
GENERATION_PROMPTS = {  # apply_chat_template(HI, add_generation_prompt=True): the family's own format
    "llama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n",
    "mistral": "<s>[INST] Hi[/INST]",
    "gemma2": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "gpt2": "\n\nHuman: Hi\n\nAssistant:",
}
GENERATION_PROMPTS["qwen3_moe"] = GENERATION_PROMPTS["qwen2"]
TWO_TURNS = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."},
             {"role": "user", "content": "And 2+4?"}, {"role": "assistant", "content": "It is 6."}]
TRAINED_TURNS = {  # what align's data layer trains on in TWO_TURNS: each reply and its end of turn
    "llama": "It is 5.<|eot_id|>It is 6.<|eot_id|>",
    "qwen2": "It is 5.<|im_end|>\nIt is 6.<|im_end|>\n",
    "mistral": " It is 5.</s> It is 6.</s>",
    "gemma2": "It is 5.<end_of_turn>\nIt is 6.<end_of_turn>\n",
    # its template closes a conversation with EOS, which an earlier turn does not have: the last reply trains it
    "phi3": "It is 5.<|end|>\nIt is 6.<|end|>\n<|endoftext|>",
    "gpt2": " It is 5.<|endoftext|> It is 6.<|endoftext|>",
}
TRAINED_TURNS["qwen3_moe"] = TRAINED_TURNS["qwen2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_folder_loads_with_its_conventions(family_dir, name):
    spec, folder = SPECS[name], family_dir(name)
    auto_tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    config = ModelConfig(name_or_path=str(folder))
    tokenizer = models.load_tokenizer(config)
    models.load_model(config, tokenizer)
    # the class tokenizer_config.json names rebuilds the same tokenizer, with no token beyond the embeddings
    assert len(auto_tokenizer) == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert auto_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert type(auto_tokenizer).__name__ == spec.tokenizer_class.replace("PreTrainedTokenizerFast", "TokenizersBackend")
    ids = tokenizer(TEXT)["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) == spec.adds_bos and ids[-1] != tokenizer.eos_token_id
    assert (tokenizer.eos_token, tokenizer.pad_token) == (spec.eos, spec.pad)
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == spec.pad_is_eos
    assert tokenizer.apply_chat_template(HI, tokenize=False, add_generation_prompt=True) == GENERATION_PROMPTS[name]
    assert model.config.model_type == spec.model_type and model.config._attn_implementation == spec.attn_implementation
    assert getattr(model.config, "sliding_window", None) == spec.sliding_window
    assert {getattr(model.config, k) for k in DROPOUT_KEYS.get(spec.model_type, ("attention_dropout",))} == {
        spec.dropout}


@pytest.mark.parametrize("name", FAMILIES)
def test_two_turn_conversation_trains_each_reply(family_dir, name):
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(family_dir(name))))
    rows = Rows([{"messages": TWO_TURNS}], [("conversation", 1)])
    example = tokenize_sft(rows, tokenizer, max_length=128, truncation="keep_start", key="data.train").examples[0]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(trained) == TRAINED_TURNS[name]


def test_building_is_deterministic(family_dir, tmp_path):
    """The command line, in a fresh process, writes the same bytes as this session's build."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, os.path.join(HERE, "families.py"), str(tmp_path), "--families", "qwen2"],
                   check=True, env=env, capture_output=True)
    ours = family_dir("qwen2")
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "qwen2").iterdir())
    for name in names:
        assert (tmp_path / "qwen2" / name).read_bytes() == (ours / name).read_bytes(), name
