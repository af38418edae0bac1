"""`align generate`: batched sampling from a saved model, in input order, greedy or sampled."""

import json

import torch
from transformers import AutoModelForCausalLM

from align import builtin
from align.cli import main
from align.evaluate import greedy_completions


def _saved_model(tmp_path):
    tok = builtin.load_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(builtin.model_config("builtin:tiny", tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return model, tok, str(tmp_path / "m")


def test_generate_greedy_matches_the_evaluator_and_keeps_order(tmp_path):
    model, tok, path = _saved_model(tmp_path)
    prompts = ["1+1=", "12+34=", "99+99=", "5+7="]
    rows = [{"prompt": p, "id": i} for i, p in enumerate(prompts)]
    rows.append({"messages": [{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"}], "id": 4})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", path, "--prompts", str(tmp_path / "p.jsonl"), "--output", str(out),
                 "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [0, 1, 2, 3, 4]
    expected = greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=8)
    assert [r["completion"] for r in got[:4]] == [expected[i] for i in range(4)]
    assert all(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) <= 5 for r in got)


def test_generate_sampling_several_per_prompt_is_seeded(tmp_path):
    _, _, path = _saved_model(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--model", path, "--prompts", str(tmp_path / "p.jsonl"), "--output", str(out),
                     "--temperature", "1.0", "--num-samples", "4", "--seed", "3"]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outs[0] == outs[1] and [r["sample"] for r in outs[0]] == [0, 1, 2, 3]
    assert len({r["completion"] for r in outs[0]}) > 1  # an untrained model samples different texts


def test_generate_sampling_does_not_depend_on_the_batch_or_the_processes(tmp_path):
    """Each (prompt, sample) job has its own key: the second of two processes (jobs 1, 3, 5, ...) samples
    what one process samples for those jobs, and batch size 1 what batch size 16 does."""
    from align.data import Rows
    from align.generate import sample_jobs
    from align.rollout import SamplingConfig

    model, tok, _ = _saved_model(tmp_path)
    tok.padding_side = "left"
    rows = Rows([{"prompt": f"{a}+{b}="} for a, b in [(1, 1), (12, 34), (99, 99), (5, 7), (40, 2)]],
                [("p", i + 1) for i in range(5)])
    jobs = [(i, s) for i in range(5) for s in range(3)]

    def run(share, batch):
        return sample_jobs(model, tok, rows, share, sampling=SamplingConfig(max_new_tokens=5, batch_size=batch),
                           num_samples=3, seed=5, do_sample=True)

    whole = run(jobs, 16)
    second_process = run(jobs[1::2], 16)
    assert second_process == {job: whole[job] for job in jobs[1::2]}
    assert run(jobs, 1) == whole
    assert len(set(whole.values())) > 5  # an untrained model samples different texts


def test_generate_bad_prompts_file(tmp_path, capsys):
    _, _, path = _saved_model(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "1+1"}) + "\n")
    assert main(["generate", "--model", path, "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "expected prompt or messages" in capsys.readouterr().err
