"""Conformance matrix: every stage on every model family, reloaded the way a user reloads it.

Each cell (stage x family, test id `sft-packed[qwen2]`) runs the real stage in-process from a
recipe dict (the stage built as `align.planning.run` builds it, then the engine's `train`) for
TWO optimizer steps on six rows, from the tiny random-weight folder of the family
(`tests/families.py`: its architecture, its tokenizer's conventions, its chat template). Then:

1. training moved the weights: most saved tensors differ from the family's starting ones
   (an adapter: the adapted model's logits differ from the base model's);
2. the saved folder is the trained model: reloaded with plain transformers
   (`AutoModelForCausalLM`, `AutoModelForSequenceClassification` for a reward model,
   `peft.AutoPeftModelForCausalLM` for an adapter), its logits on a chat-templated prompt equal
   those of the model the run held in memory, and its tokenizer is the family's (vocabulary,
   special tokens, chat template);
3. the reloaded policy generates new tokens from that prompt (a reward model scores it).

One more check per family is about the online stages' sampling: a completion ends at every token the
model's generation config stops at, as `generate` ends it (Gemma 2 instruct ends a turn with
<end_of_turn>, listed next to <eos>). Layout exactness (packed rows, shared-prompt pairs, GRPO group
rows against single-row forwards) is test_family_logprobs.py's.

The cells cover every data format (messages, string and conversational prompt/completion,
string, conversational and implicit-prompt pairs, chat prompts with an `answer`), so the
family's chat template is on every stage's path. Evaluation is two held-out rows without
generation, except the online stages, whose evaluation is greedy generation itself (two
prompts, two tokens). PPO's reward model is the family's weights under a scalar head
(`family_runs.score_model`); LoRA runs on three families that differ most in their linear
layers (Llama's separate projections, GPT-2's Conv1D, Phi-3's fused qkv / gate_up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from families import FAMILIES, SPECS
from family_runs import DATA, build_stage, recipe_dict, rows_chat_prompts, score_model, user
from safetensors.torch import load_file

from align import engine


@dataclass(frozen=True)
class Cell:
    stage: str
    data: str
    """A key of family_runs.DATA: the training rows (the eval set is their last two)."""
    overrides: dict = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES

    @property
    def head(self) -> str:
        return "score" if self.stage == "reward" else "causal_lm"

    @property
    def lora(self) -> bool:
        return bool(self.overrides.get("model.lora.enabled"))


ONLINE_EVAL = {"eval.generate": True, "eval.max_new_tokens": 2}
LORA = {"model.lora.enabled": True, "model.lora.r": 4, "train.lr": 1e-2}
LORA_FAMILIES = tuple(f for f in ("llama", "gpt2", "phi3") if f in FAMILIES)

CELLS = {
    # batch of ONE packed row of up to 128 tokens: two or more conversations share it
    "sft-packed": Cell("sft", "messages", {"data.packing": True, "data.max_length": 128, "train.batch_size": 1}),
    "sft-padded": Cell("sft", "chat_prompt_completion", {"data.packing": False}),
    "reward": Cell("reward", "chat_pairs"),
    "dpo": Cell("dpo", "pairs"),
    "ipo": Cell("dpo", "chat_pairs", {"dpo.loss_type": "ipo"}),
    "simpo": Cell("simpo", "implicit_chat_pairs"),
    "orpo": Cell("orpo", "pairs"),
    # exact_match is ~0 for a random model; the length penalty varies within a group, so advantages are not 0
    "grpo": Cell("grpo", "chat_prompts", {"grpo.num_generations": 2, "grpo.max_new_tokens": 3, "grpo.beta": 0.04,
                                          "grpo.reward_funcs": ["exact_match", "length"], "grpo.plot": False,
                                          "train.batch_size": 4, **ONLINE_EVAL}),
    "ppo": Cell("ppo", "chat_prompts", {"ppo.max_new_tokens": 3, "ppo.ppo_epochs": 1, "ppo.plot": False,
                                        "ppo.eval_kl_prompts": 2, **ONLINE_EVAL}),
    "sft-lora": Cell("sft", "prompt_completion", {**LORA, "data.packing": False}, LORA_FAMILIES),
    "dpo-lora": Cell("dpo", "chat_pairs", LORA, LORA_FAMILIES),
}
MATRIX = [pytest.param(name, family, id=f"{name}[{family}]") for name, cell in CELLS.items()
          for family in cell.families]


# ---------------------------------------------------------------------------
# run, reload, compare
# ---------------------------------------------------------------------------
def train_cell(cell: Cell, start_dir, tmp_path):
    """Two steps of the cell's stage: -> (the stage, holding the trained model, final metrics)."""
    overrides = dict(cell.overrides)
    if cell.stage == "ppo":
        overrides["ppo.reward_model"] = str(score_model(start_dir))
    stage, recipe = build_stage(recipe_dict(cell.stage, start_dir, DATA[cell.data](), tmp_path, overrides))
    return stage, engine.train(stage, recipe, stage.accelerator)


def chat_prompt_ids(tokenizer) -> torch.Tensor:
    """(1, P) ids of a one-turn conversation with the generation prompt, as a user's script builds them."""
    out = tokenizer.apply_chat_template(user("What is 2 plus 3?"), add_generation_prompt=True, tokenize=True,
                                        return_tensors="pt")
    return out["input_ids"] if hasattr(out, "keys") else out


def trained_model(stage):
    """The trained model as the run holds it, unwrapped (PPO: its policy), in eval mode (dropout off)."""
    model = stage.accelerator.unwrap_model(stage.model)
    return getattr(model, "policy", model).eval()


def reload(cell: Cell, out):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if cell.lora:
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(out).eval()
    auto = AutoModelForSequenceClassification if cell.head == "score" else AutoModelForCausalLM
    return auto.from_pretrained(out).eval()


def changed_share(start: dict, end: dict) -> float:
    """Share of the starting tensors (present in both under the same name and shape) whose values changed."""
    shared = [k for k in start if k in end and start[k].shape == end[k].shape]
    assert len(shared) >= len(start) // 2, f"the saved weights do not carry the start's names: {sorted(end)[:5]}"
    return sum(not torch.equal(start[k], end[k]) for k in shared) / len(shared)


def check_weights_moved(cell: Cell, start_dir, out, reloaded, ids) -> None:
    if cell.lora:  # a new adapter starts as the identity (B = 0): trained, it changes the base model's logits
        with reloaded.disable_adapter():
            base = reloaded(ids).logits
        assert not torch.allclose(base, reloaded(ids).logits), "the adapter did not change the model"
        return
    share = changed_share(load_file(str(start_dir / "model.safetensors")), load_file(str(out / "model.safetensors")))
    assert share > 0.5, f"only {share:.0%} of the weight tensors changed in two steps"


def shares_prompts(family: str) -> bool:
    """Whether align may put a pair's prompt once in a row with a 4D mask (`supports_shared_prompt`): sdpa
    attention and no sliding window. Mistral (window 16) and Gemma 2 (eager, alternating windows) fall
    back to two rows per pair."""
    spec = SPECS[family]
    return spec.attn_implementation == "sdpa" and spec.sliding_window is None


def check_tokenizer(start_dir, out):
    """The saved tokenizer reloads with AutoTokenizer as the family's own: -> the reloaded tokenizer."""
    from transformers import AutoTokenizer

    start, saved = AutoTokenizer.from_pretrained(start_dir), AutoTokenizer.from_pretrained(out)
    assert saved.get_vocab() == start.get_vocab()
    assert saved.chat_template == start.chat_template
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == (start.bos_token, start.eos_token, start.pad_token)
    return saved


@pytest.mark.parametrize("name,family", MATRIX)
def test_stage_on_family(name, family, family_dir, tmp_path):
    """Two steps of the stage, then: weights moved, the reloaded folder is the trained model, it generates."""
    cell = CELLS[name]
    start_dir = family_dir(family)
    stage, metrics = train_cell(cell, start_dir, tmp_path)
    assert metrics["train/steps"] == 2
    if name == "sft-packed":  # the cell's point: samples shared a row
        assert len(stage.batches.examples) < len(DATA[cell.data]())
    if hasattr(stage, "shared_prompt"):  # pairs go as one shared-prompt row unless the attention forbids it
        assert stage.shared_prompt == shares_prompts(family)
    out = tmp_path / "out"
    tokenizer = check_tokenizer(start_dir, out)
    ids = chat_prompt_ids(tokenizer)
    reloaded = reload(cell, out)
    with torch.no_grad():
        check_weights_moved(cell, start_dir, out, reloaded, ids)
        torch.testing.assert_close(reloaded(ids).logits, trained_model(stage)(ids).logits, rtol=1e-5, atol=1e-5)
        if cell.head == "causal_lm":
            generated = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                          do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert generated.shape[1] > ids.shape[1]


def stop_ids(model) -> list[int]:
    ids = model.generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids)


def force_token(model, token: int):
    """Make `token` every step's argmax and sample (+1e4 on its logit); returns the hook's handle."""
    return model.get_output_embeddings().register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([token]), torch.full(out.shape[:-1] + (1,), 1e4)))


@pytest.mark.parametrize("family", FAMILIES)
def test_rollouts_stop_where_generate_stops(family, family_dir, tmp_path):
    """Each stop token of the model's generation config, forced as the first sampled token, ends a GRPO
    rollout's completions there (one token, marked ended: no missing-EOS penalty), as it ends `generate`."""
    stage, _ = build_stage(recipe_dict("grpo", family_dir(family), rows_chat_prompts(), tmp_path, {
        "grpo.num_generations": 2, "grpo.max_new_tokens": 4, "train.batch_size": 4}))
    ids = chat_prompt_ids(stage.tokenizer)
    for stop in stop_ids(stage.model):
        handle = force_token(stage.model, stop)
        try:
            generated = stage.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                             do_sample=False, pad_token_id=stage.tokenizer.pad_token_id)
            out, _, _ = stage.make_rollout(0)
        finally:
            handle.remove()
        assert generated[0, ids.shape[1]:].tolist() == [stop]
        name = stage.tokenizer.convert_ids_to_tokens(stop)
        assert out.lengths.tolist() == [1] * 4 and out.ended.all(), f"the rollout runs past {name!r} (id {stop})"
