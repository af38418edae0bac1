"""Every family, every batch layout: the numbers a stage's loss is built from equal a plain forward.

For each tiny model of tests/families.py (Llama 3, Qwen2, Mistral, Gemma 2, Phi-3, GPT-2,
Qwen3-MoE), the quantities each stage computes its loss from, on the batch that stage
really builds, are compared with an unpadded single-row forward of the same model (fp32,
eval mode, no dropout): to 1e-5 on each token's log-prob.

| stage | quantity | layouts |
|---|---|---|
| SFT | per-token log-probs of the trained tokens | padded rows, packed rows (position_ids), padding-free |
| DPO/IPO/SimPO/ORPO | summed completion log-probs and token counts (`pair_logps`) | the default (shared-prompt rows where the model can take them), two rows per pair |
| reward | score at the last real token | shared-prompt rows, right- and left-padded rows, PPO's rollout rows |
| GRPO | completion log-probs (`completion_logprobs`) | one row per group (repeated prompts), one row per completion |
| PPO | log-probs and values (`forward_completion`) | left-padded prompts, completions padded after EOS |

Pairs come in every format the data layer reads: an explicit prompt, message lists through
the family's chat template, an implicit prompt (HH-RLHF transcripts), and no prompt at all.
A completion with nothing before it (empty prompt, no BOS) cannot have its first token
scored by any forward, so the reference sums tokens 1.. only; with a BOS every token counts.

Where the code picks a layout per model (prefix sharing needs an attention that applies a
custom 4D mask and no sliding window: `supports_shared_prompt`), each test asserts which
layout was picked for the family (`SHARES_PROMPT`) and checks the one that runs.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache

import pytest
import torch
from families import FAMILIES, SHARED_DATA, SPECS, FamilySpec

from align import models
from align.data import IGNORE, Rows, collate, encode_prompt, pack, tokenize_sft
from align.evaluate_rm import pair_rewards
from align.logprobs import OutputHead
from align.preference_data import (
    collate_pairs,
    collate_shared_pairs,
    supports_shared_prompt,
    tokenize_preferences,
)
from align.recipe import ModelConfig
from align.rewards import RewardModel
from align.rollout import (
    Rollout,
    completion_logprobs,
    completion_mask,
    left_pad,
    score_logprobs,
    unique_prompts,
)
from align.stages import sft
from align.stages.ppo import PolicyAndValue, forward_completion
from align.stages.preference import pair_logps

ATOL = 1e-5  # per token log-prob (sums of n tokens: n x ATOL)
MAX_LENGTH = 96
SHARES_PROMPT = {  # whether the stages may put a pair or a group in one row with a 4D mask
    "llama": True, "qwen2": True, "phi3": True, "gpt2": True, "qwen3_moe": True,
    "mistral": False,  # sliding window: a custom 4D mask would replace it
    "gemma2": False,  # eager attention (adds a mask, cannot take a boolean one) and sliding layers
}


# ---------------------------------------------------------------------------
# real text
# ---------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _read(name: str) -> tuple[dict, ...]:
    with gzip.open(SHARED_DATA / name, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle)


def gsm8k(n: int) -> list[tuple[str, str]]:
    """(question's first sentence, answer's first line) of the first n GSM8K test problems."""
    out = []
    for row in _read("gsm8k-test.jsonl.gz")[:n]:
        question = row["question"].split(". ")[0].rstrip(".") + "."
        out.append((question, row["answer"].split("\n")[0]))
    return out


def hh_pairs(n: int) -> list[dict]:
    """The first n HH-RLHF pairs short enough (< 350 characters) to keep a completion within MAX_LENGTH."""
    rows = [r for r in _read("hh-rlhf-harmless-base-test.jsonl.gz") if max(len(r["chosen"]), len(r["rejected"])) < 350]
    return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n]]


def sft_rows(kind: str) -> list[dict]:
    problems = gsm8k(6)
    if kind == "prompt_completion":
        return [{"prompt": q, "completion": a} for q, a in problems]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in problems]


def pair_rows(kind: str) -> list[dict]:
    """Preference rows of one format (TRL's names)."""
    problems = gsm8k(4)
    answers = [a for _, a in problems]
    rejected = answers[1:] + answers[:1]  # another problem's answer
    if kind == "explicit":
        return [{"prompt": q, "chosen": a, "rejected": r} for (q, a), r in zip(problems, rejected)]
    if kind == "conversational":
        def say(role, text):
            return [{"role": role, "content": text}]

        return [{"prompt": say("user", q), "chosen": say("assistant", a), "rejected": say("assistant", r)}
                for (q, a), r in zip(problems, rejected)]
    if kind == "implicit":
        return hh_pairs(3)
    assert kind == "empty_prompt"  # nothing shared: the implicit prompt is ""
    return [{"chosen": "Yes it is.", "rejected": "No way."}, {"chosen": "It is 18.", "rejected": "Maybe 20?"}]


# ---------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------
@dataclass
class Family:
    """One family's folder as the stages load it (`align.models`)."""

    spec: FamilySpec
    config: ModelConfig
    tokenizer: object

    def load(self, head: str = "causal_lm"):
        torch.manual_seed(0)  # a score head is new: drawn from the global RNG
        return models.load_model(self.config, self.tokenizer, head=head)

    @cached_property
    def model(self):
        """The causal LM in eval mode (dropout off), shared by the tests of a family."""
        return self.load().eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_dir) -> Family:
    # chunked log-probs even where a batch's logits would fit in one chunk (`auto` runs the plain path there)
    config = ModelConfig(name_or_path=str(family_dir(request.param)), chunked_logprobs=True)
    return Family(SPECS[request.param], config, models.load_tokenizer(config))


@pytest.fixture(scope="module")
def scorer(family):
    """The family's backbone with a new scalar head (reward / value model), eval mode."""
    return family.load(head="score").eval()


# ---------------------------------------------------------------------------
# the reference: one sequence, no padding, no mask, no position_ids
# ---------------------------------------------------------------------------
@torch.no_grad()
def row_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..T-1 from a plain forward of the row alone: (T-1,)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def row_scores(scorer, ids: list[int]) -> torch.Tensor:
    """The scalar head at every position of the row alone: (T,)."""
    hidden = scorer.base_model(input_ids=torch.tensor([ids])).last_hidden_state
    return scorer.score(hidden)[0, :, 0].float()


def completion_reference(model, prompt_ids: list[int], completion_ids: list[int]) -> tuple[float, int]:
    """(summed log-prob, count) of the completion tokens that have a token before them in [prompt, completion]."""
    lp = row_logprobs(model, prompt_ids + completion_ids)
    first = max(len(prompt_ids), 1)  # an empty prompt without BOS: the first token has nothing before it
    return lp[first - 1:].sum().item(), len(prompt_ids) + len(completion_ids) - first


def samples_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sample of an SFT batch in row-major order: padded rows cut at
    their attention mask, packed rows where position_ids restart."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][r].tolist(), batch["labels"][r].tolist()
        if "position_ids" in batch:
            starts = [t for t, p in enumerate(batch["position_ids"][r].tolist()) if p == 0] + [len(ids)]
            out += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
        else:
            n = int(batch["attention_mask"][r].sum())
            out.append((ids[:n], labels[:n]))
    return out


# ---------------------------------------------------------------------------
# the check can fail
# ---------------------------------------------------------------------------
def test_reference_tells_contexts_and_positions_apart(family):
    """The random weights are far enough from uniform that a wrong context or a gap in the positions
    moves log-probs by much more than ATOL: a layout error cannot hide under the tolerance."""
    tok, model = family.tokenizer, family.model
    (q1, a), (q2, _) = gsm8k(2)
    answer = tok(a, add_special_tokens=False)["input_ids"][:8]
    p1, p2 = encode_prompt(tok, q1)[-6:], encode_prompt(tok, q2)[-6:]
    wrong_context = row_logprobs(model, p1 + answer)[5:] - row_logprobs(model, p2 + answer)[5:]
    assert wrong_context.abs().max() > 1e-2
    ids = torch.tensor([p1 + answer])
    gap = torch.arange(ids.shape[1])[None] + (torch.arange(ids.shape[1]) >= 6)  # the answer one position later
    with torch.no_grad():
        moved = model(input_ids=ids, position_ids=gap).logits[0, 5:-1].log_softmax(-1)
    assert (moved - model(input_ids=ids).logits[0, 5:-1].log_softmax(-1)).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------
def sft_batch(family: Family, layout: str, kind: str) -> dict:
    """A micro-batch as the SFT stage collates it (align.stages.sft: data.packing, data.padding_free)."""
    examples = tokenize_sft(Rows(sft_rows(kind), [("rows", i + 1) for i in range(6)]), family.tokenizer,
                            max_length=MAX_LENGTH, truncation="keep_start", key="data.train").examples
    pad = family.tokenizer.pad_token_id
    if layout == "padded":
        return collate(examples, pad)
    if layout == "packed":
        return collate(pack(examples, MAX_LENGTH), pad, width=MAX_LENGTH)
    if layout == "packed_padding_free":
        return collate(pack(examples, MAX_LENGTH), pad, padding_free=True)
    return collate(examples, pad, padding_free=True)


@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
@pytest.mark.parametrize("layout", ["padded", "packed", "padding_free", "packed_padding_free"])
def test_sft_token_logprobs(family, layout, kind, monkeypatch):
    batch = sft_batch(family, layout, kind)
    seen = []  # the (per-token log-probs, targets) SFTStage.loss builds its NLL from
    real_token_logprobs = OutputHead.token_logprobs

    def recording(self, hidden, targets, **kwargs):
        seen.append((real_token_logprobs(self, hidden, targets, **kwargs), targets))
        return seen[-1][0]

    monkeypatch.setattr(OutputHead, "token_logprobs", recording)
    with torch.no_grad():  # the stage's loss needs no stage state: a bare instance runs it
        loss_sum, _ = sft.SFTStage.__new__(sft.SFTStage).loss(family.model, dict(batch))
    logps, labels = seen[0]
    got = logps[labels != IGNORE]
    expected = torch.cat([row_logprobs(family.model, ids)[torch.tensor(sample_labels[1:]) != IGNORE]
                          for ids, sample_labels in samples_of(batch)])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss_sum, -expected.sum(), atol=ATOL * len(expected), rtol=0)


# ---------------------------------------------------------------------------
# preference pairs
# ---------------------------------------------------------------------------
def tokenized_pairs(family: Family, kind: str, prompt_truncation: str = "keep_start") -> list[dict]:
    rows = pair_rows(kind)
    return tokenize_preferences(Rows(rows, [("rows", i + 1) for i in range(len(rows))]), family.tokenizer,
                                max_length=MAX_LENGTH, key="data.train", prompt_truncation=prompt_truncation).examples


def pair_layout(family: Family, model, shared_prompt: bool) -> str:
    """The layout the preference and reward stages pick (data.shared_prompt and the model)."""
    chosen = "shared_prompt" if shared_prompt and supports_shared_prompt(model) else "two_rows"
    assert supports_shared_prompt(model) == SHARES_PROMPT[family.spec.name]
    return chosen


COLLATE = {"shared_prompt": collate_shared_pairs, "two_rows": collate_pairs}


def pair_mismatches(model, pairs: list[dict], got: dict, got_prompt_nll: torch.Tensor) -> list[str]:
    """What of `pair_logps`'s output (and its chosen NLL with nll_on_prompt) differs from the reference."""
    wrong = []
    for side in ("chosen", "rejected"):
        reference = [completion_reference(model, p["prompt_ids"], p[f"{side}_ids"]) for p in pairs]
        sums, counts = torch.tensor([s for s, _ in reference]), torch.tensor([float(n) for _, n in reference])
        if not torch.equal(got[f"{side}_n"], counts):
            wrong.append(f"{side} token counts {got[f'{side}_n'].tolist()}, expected {counts.tolist()}")
        if not torch.allclose(got[side], sums, atol=ATOL * counts.max().item(), rtol=0):
            wrong.append(f"{side} summed log-probs {got[side].tolist()}, expected {sums.tolist()}")
    if not torch.allclose(got["chosen_nll"], -got["chosen"] / got["chosen_n"], atol=ATOL, rtol=0):  # RPO, ORPO
        wrong.append(f"chosen NLL {got['chosen_nll'].tolist()} is not the token mean of the chosen log-probs")
    expected = torch.stack([-row_logprobs(model, p["prompt_ids"] + p["chosen_ids"]).mean() for p in pairs])
    if not torch.allclose(got_prompt_nll, expected, atol=ATOL, rtol=0):  # ORPO with orpo.nll_on_prompt
        wrong.append(f"prompt + chosen NLL {got_prompt_nll.tolist()}, expected {expected.tolist()}")
    return wrong


@pytest.mark.parametrize("kind", ["explicit", "conversational", "implicit", "empty_prompt"])
@pytest.mark.parametrize("shared_prompt", [True, False], ids=["shared_prompt_on", "shared_prompt_off"])
def test_pair_logps(family, kind, shared_prompt):
    pairs = tokenized_pairs(family, kind)
    if kind == "empty_prompt":
        assert all(p["prompt_ids"] == ([family.tokenizer.bos_token_id] if family.spec.adds_bos else []) for p in pairs)
    layout = pair_layout(family, family.model, shared_prompt)
    batch = COLLATE[layout](pairs, family.tokenizer.pad_token_id)
    with torch.no_grad():
        got = pair_logps(family.model, batch)
        got_prompt_nll = pair_logps(family.model, batch, nll_on_prompt=True)["chosen_nll"]
    wrong = pair_mismatches(family.model, pairs, got, got_prompt_nll)
    assert not wrong, f"{layout} layout: " + "; ".join(wrong)


# ---------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------
def reward_pairs(family: Family) -> list[dict]:
    """Pairs of every prompt format, tokenized as the reward stage does (the prompt's end kept)."""
    return [p for kind in ("explicit", "conversational", "implicit", "empty_prompt")
            for p in tokenized_pairs(family, kind, prompt_truncation="keep_end")]


def reward_rollout(family: Family, pairs: list[dict]) -> Rollout:
    """PPO's reward rows (`RewardModel.score_rollout`): left-padded prompts, then the chosen completions
    padded after their end."""
    pad = family.tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([p["prompt_ids"] for p in pairs], pad)
    C = max(len(p["chosen_ids"]) for p in pairs)
    completion_ids = torch.tensor([p["chosen_ids"] + [pad] * (C - len(p["chosen_ids"])) for p in pairs])
    mask = torch.tensor([[1] * len(p["chosen_ids"]) + [0] * (C - len(p["chosen_ids"])) for p in pairs])
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, torch.ones(len(pairs), dtype=torch.bool))


@pytest.mark.parametrize("layout", ["stage_default", "right_padded", "left_padded", "rollout"])
def test_last_token_rewards(family, scorer, layout):
    pairs = reward_pairs(family)
    pad = family.tokenizer.pad_token_id
    expected = {side: torch.stack([row_scores(scorer, p["prompt_ids"] + p[f"{side}_ids"])[-1] for p in pairs])
                for side in ("chosen", "rejected")}
    with torch.no_grad():
        if layout == "rollout":
            got = {"chosen": RewardModel(scorer).score_rollout(reward_rollout(family, pairs))}
        else:
            if layout == "stage_default":
                batch = COLLATE[pair_layout(family, scorer, True)](pairs, pad)
            else:
                batch = collate_pairs(pairs, pad, padding_side=layout.split("_")[0])
            got = dict(zip(("chosen", "rejected"), pair_rewards(scorer, batch)))
    for side, value in got.items():
        torch.testing.assert_close(value, expected[side], atol=ATOL, rtol=0, msg=f"{layout} {side}")


# ---------------------------------------------------------------------------
# GRPO and PPO: completions of left-padded prompts
# ---------------------------------------------------------------------------
def rollout_rows(family: Family, grouped: bool, C: int = 14) -> Rollout:
    """Rows as `align.rollout.rollout` returns them: prompts (a GRPO group repeats its prompt) left-padded,
    completions ending at their EOS and padded after it, one cut at C tokens without EOS."""
    tok = family.tokenizer
    problems = gsm8k(6)
    prompts = [encode_prompt(tok, q if i % 2 else [{"role": "user", "content": q}]) for i, (q, _) in enumerate(problems)]
    if grouped:  # two groups of three
        prompts = [prompts[0]] * 3 + [prompts[1]] * 3
    rows = []
    for i, (_, answer) in enumerate(problems):
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        rows.append(ids[:C] if i == 4 else ids[: 3 + 2 * i] + [tok.eos_token_id])
    completion_ids = torch.tensor([r + [tok.pad_token_id] * (C - len(r)) for r in rows])
    mask, ended = completion_mask(completion_ids, tok.eos_token_id)
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, ended)


def real_rows(out: Rollout) -> list[tuple[int, list[int]]]:
    """(real prompt length, [real prompt tokens, real completion tokens]) of each rollout row."""
    rows = []
    for b in range(out.prompt_ids.shape[0]):
        prompt = out.prompt_ids[b][out.prompt_mask[b].bool()].tolist()
        rows.append((len(prompt), prompt + out.completion_ids[b, : int(out.completion_mask[b].sum())].tolist()))
    return rows


def reference_logprobs(model, out: Rollout, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per row, the log-probs of its completion tokens from the row alone."""
    return [row_logprobs(model, ids, temperature)[P - 1:] for P, ids in real_rows(out)]


def reference_values(scorer, out: Rollout) -> list[torch.Tensor]:
    """Per row, the value of the state before each completion token, from the row alone."""
    return [row_scores(scorer, ids)[P - 1: -1] for P, ids in real_rows(out)]


def assert_rows_match(got: torch.Tensor, refs: list[torch.Tensor], what: str) -> None:
    """got (B, C): each row's first len(ref) entries equal ref."""
    for b, ref in enumerate(refs):
        torch.testing.assert_close(got[b, : len(ref)], ref, atol=ATOL, rtol=0, msg=lambda m, b=b: f"{what} row {b}: {m}")


@pytest.mark.parametrize("grouped", [True, False], ids=["groups", "distinct_prompts"])
def test_grpo_completion_logprobs(family, grouped):
    out = rollout_rows(family, grouped)
    policy = family.load().train()  # GRPO's loss runs in train mode; the loader switched dropout off
    shares = SHARES_PROMPT[family.spec.name]
    assert (unique_prompts(out.prompt_ids, out.prompt_mask) is not None) == grouped
    assert supports_shared_prompt(policy) == shares  # one row per group only then (rollout._shares_prompts)
    args = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    with torch.no_grad():
        training = completion_logprobs(policy, *args, temperature=0.7)
    scoring = score_logprobs(family.model, *args)  # rollout time: eval mode, temperature 1
    assert_rows_match(training, reference_logprobs(family.model, out, 0.7), "log-probs (training forward, T=0.7)")
    assert_rows_match(scoring, reference_logprobs(family.model, out), "log-probs (score_logprobs)")
    for logps in (training, scoring):
        assert (logps[out.completion_mask == 0] == 0).all()  # nothing after the EOS


def test_ppo_logprobs_and_values(family):
    out = rollout_rows(family, grouped=False)
    policy, value = family.load(), family.load(head="score")  # dropout off (model.disable_dropout, the default)
    with torch.no_grad():
        logps, values, _ = forward_completion(PolicyAndValue(policy, value).train(), out.prompt_ids, out.prompt_mask,
                                              out.completion_ids, out.completion_mask, 1.0)
    assert_rows_match(logps, reference_logprobs(family.model, out), "log-probs")
    assert_rows_match(values, reference_values(value.eval(), out), "values")
