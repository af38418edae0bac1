"""Preference pairs from a policy's own samples, labelled by a verifier (`data.from_policy`).

InstructGPT (Ouyang et al. 2022, sec. 3.5) trains its reward model on labellers'
comparisons of the SFT policy's OWN samples, so the reward model learns to rank what PPO
will actually produce. A reward model trained on other pairs (on the built-in task: the
true sum vs a synthetic wrong sum, `align.task.wrong_answers`) can rank those well and the
policy's samples barely better than chance — a proxy with nothing to teach PPO.

Here the labeller is simulated by a reward function (`align.rewards`, default
`exact_match`: a sample scoring > 0.5 is correct). Per source:

1. sample `num_samples` completions per prompt from `policy` at `temperature`
   (`align.generate.generate`, the same sampling code as `align generate`; the samples
   are kept next to the pairs, `<pairs file>.samples.jsonl`);
2. label every sample with the reward function (the prompt row's other columns, e.g.
   the reference `completion`, are passed to it);
3. for every prompt with at least one correct AND one incorrect distinct sample, draw up
   to `pairs_per_prompt` distinct (chosen = correct, rejected = incorrect) pairs with a
   seeded RNG (`build_pairs`). Prompts whose samples all agree give no pair.

A recipe asks for it under `data.from_policy`; the planning layer (`align.planning`) writes
the files before the stage starts when they are missing (as `model.from_recipe` trains a
missing model), after training the policy by `policy_recipe` when its folder is missing too. Existing
files are used as they are: delete them to rebuild. Deterministic for a given policy and
seed, whatever the number of processes (every (prompt, sample) has its own sampling key).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from align.errors import AlignError
from align.recipe import PolicyPairsConfig, PolicySource


def build_pairs(rows: list[dict], samples: list[list[str]], labels: list[list[float]], *, pairs_per_prompt: int = 1,
                seed: int = 0) -> list[dict]:
    """(prompt, chosen = a correct sample, rejected = an incorrect one) pairs, in prompt order.

    rows[i] is prompt i's row; samples[i] / labels[i] its completions and their labels
    (> 0.5: correct). Duplicate texts count once; empty completions are left out (preference
    data needs a non-empty side); prompts without both kinds are skipped.

    >>> build_pairs([{"prompt": "1+1="}, {"prompt": "2+2="}], [["2", "3", "2"], ["4", "4"]],
    ...             [[1.0, 0.0, 1.0], [1.0, 1.0]])
    [{'prompt': '1+1=', 'chosen': '2', 'rejected': '3'}]
    >>> build_pairs([{"prompt": "1+1="}], [["2", ""]], [[1.0, 0.0]])
    []
    """
    rng = random.Random(seed)
    pairs = []
    for row, texts, marks in zip(rows, samples, labels, strict=True):
        kept = [(t, m) for t, m in zip(texts, marks, strict=True) if t.strip()]
        good = list(dict.fromkeys(t for t, m in kept if m > 0.5))
        bad = list(dict.fromkeys(t for t, m in kept if m <= 0.5))
        combos = [(g, b) for g in good for b in bad]
        for chosen, rejected in rng.sample(combos, min(pairs_per_prompt, len(combos))):
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def _make_source(config: PolicyPairsConfig, source: PolicySource, key: str) -> dict:
    from align import rewards
    from align.accel import distributed_state
    from align.data import load_rows
    from align.generate import generate
    from align.io_utils import atomic_write_text

    if not source.output or source.prompts is None:
        raise AlignError(f"{key}: needs prompts (a data source) and output (the pairs .jsonl to write)")
    out = Path(source.output)
    samples_path = out.with_name(out.stem + ".samples.jsonl")
    rows = load_rows(source.prompts, key=f"{key}.prompts").rows
    sampled = generate(config.policy, source.prompts, output=str(samples_path), max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size, temperature=config.temperature,
                       num_samples=config.num_samples, seed=config.seed,
                       progress=f"{key}: sampling {config.policy}")
    K = config.num_samples
    texts = [[sampled[i * K + s]["completion"] for s in range(K)] for i in range(len(rows))]
    label_fn = rewards.resolve(config.label)
    labels = []
    for row, comps in zip(rows, texts):
        columns = {k: [v] * K for k, v in row.items() if k != "prompt"}
        labels.append(label_fn([row["prompt"]] * K, comps, **columns))
    pairs = build_pairs(rows, texts, labels, pairs_per_prompt=config.pairs_per_prompt, seed=config.seed)
    flat = [m for marks in labels for m in marks]
    stats = {"prompts": len(rows), "samples": len(flat), "sample_accuracy": sum(m > 0.5 for m in flat) / len(flat),
             "pairs": len(pairs)}
    state = distributed_state()
    if state.is_main_process:
        if not pairs:
            raise AlignError(f"{key}: no prompt of {source.prompts} got both a correct and an incorrect sample "
                             f"from {config.policy}; raise num_samples or temperature")
        atomic_write_text(out, "".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{key}: {stats['pairs']} pairs from {stats['samples']} samples of {config.policy} "
              f"(sample accuracy {stats['sample_accuracy']:.3f}) -> {out}")
    state.wait_for_everyone()
    return stats


def missing_sources(config: PolicyPairsConfig) -> list[tuple[str, PolicySource]]:
    """(key, source) of each pairs file of `data.from_policy` that does not exist yet."""
    sources = [("data.from_policy.train", config.train)]
    if config.eval is not None:
        sources.append(("data.from_policy.eval", config.eval))
    return [(k, s) for k, s in sources if not s.output or not Path(s.output).is_file()]


def ensure_policy_pairs(config: PolicyPairsConfig | None) -> None:
    """Write the pairs files of `data.from_policy` that do not exist yet, from the policy's samples.

    The policy must exist: when `policy_recipe` has to train it first, the planning layer
    (`align.planning`) runs that recipe before this step.
    """
    if config is None:
        return
    for key, source in missing_sources(config):
        _make_source(config, source, key)
