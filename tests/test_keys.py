"""`align keys` and `align train --help`, and the README's recipe key table checked against the schema.

The rule for the README table (`| key | default | meaning |` under "## Recipes"):

1. every key it names exists in the schema, with the default the table states;
2. `align keys` lists every key of the schema (it is generated from it, so nothing is left
   out there);
3. the table itself lists the keys DESIGN.md names as those every LLM stage understands and
   the keys that TRL's most used settings stand for (`learning_rate` -> `train.lr`, `bf16`
   -> `train.mixed_precision` ...: COMMON_TRL): what a person arriving from TRL looks up. The
   rest (adam_beta1, save_total_limit, model.quantization.* ...) is in `align keys`, which
   the README points to.
"""

import re

import pytest
import yaml

from align.cli import build_parser, keys_table, main
from align.recipe import recipe_keys
from align.stages import STAGES
from align.trl_names import TRL_NAMES

from helpers import REPO

DESIGN_KEYS = ["stage", "output_dir", "seed", "model.name_or_path", "data.train", "data.eval", "train.max_steps",
               "train.batch_size", "train.grad_accum", "train.lr", "train.save_steps"]
COMMON_TRL = ["learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
              "num_train_epochs", "warmup_ratio", "warmup_steps", "lr_scheduler_type", "max_grad_norm", "logging_steps",
              "save_steps", "eval_steps", "seed", "output_dir", "max_length", "bf16", "gradient_checkpointing",
              "report_to"]


def readme_table() -> dict[str, str]:
    """{key: default as written} from the README's recipe key table."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| key | default | meaning |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        key_cell, default_cell = [c.strip() for c in line.strip("|").split("|")[:2]]
        keys = re.findall(r"`([^`]+)`", key_cell)
        defaults = [d.strip() for d in default_cell.split(", ")]
        if len(defaults) != len(keys):
            defaults = [default_cell] * len(keys)  # one default for all (`model.pad_token`, `model.chat_template`)
        rows.update(zip(keys, defaults))
    return rows


def as_value(written: str):
    """The README's way of writing a default -> the value ("—": none)."""
    written = written.strip("`")
    if written == "—":
        return None
    value = yaml.safe_load(written)
    try:
        return float(value) if isinstance(value, str) else value  # PyYAML reads 1e-4 as a string
    except ValueError:
        return value


def test_readme_key_table_matches_the_schema():
    schema = {key: (None if default == "" else default) for key, default, _ in recipe_keys()}
    table = readme_table()
    assert len(table) >= 30, table  # the parser found the table
    for key, written in table.items():
        assert key in schema, f"README names {key}, which is no recipe key"
        assert as_value(written) == schema[key], f"README says {key} defaults to {written}, the schema {schema[key]!r}"
    wanted = set(DESIGN_KEYS) | {TRL_NAMES[name] for name in COMMON_TRL}
    assert not sorted(wanted - set(table)), "keys the README table should list"


def test_align_keys_lists_every_key_with_default_and_meaning(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("\n\n")[0].splitlines()[1:]}
    assert listed == {key for key, _, _ in recipe_keys()}
    line = next(x for x in out.splitlines() if x.startswith("train.lr "))
    assert "0.0001" in line and "learning rate" in line
    assert re.search(r"learning_rate\s+-> train\.lr", out)
    # one stage: the common sections and that stage's, and the TRL names of that stage
    dpo = keys_table("dpo")
    assert "dpo.beta" in dpo and "grpo.num_generations" not in dpo and "train.epochs" in dpo
    assert re.search(r"beta\s+-> dpo\.beta", dpo) and "ppo.kl_coef" not in dpo


def test_train_help_lists_the_stages():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for name, spec in STAGES.items():
        assert re.search(rf"^  {name}\s+{re.escape(spec.summary)}$", text, re.M), name


def test_keys_of_an_unknown_stage_is_bad_input(capsys):
    assert main(["keys", "dop"]) == 2
    assert "unknown stage 'dop'" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["train.lr", "train.epochs", "data.max_length", "dpo.beta"])
def test_every_listed_key_has_a_meaning(key):
    docs = {k: doc for k, _, doc in recipe_keys()}
    assert docs[key], key
