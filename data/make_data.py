"""Regenerate the built-in task's data files and the shipped tokenizer.

    python data/make_data.py

Writes data/arith/*.jsonl (see data/README.md) and align/assets/tokenizer/. The
output is deterministic: running it again reproduces the committed files byte for
byte (a test checks this).
"""

from pathlib import Path

from align import builtin, task

HERE = Path(__file__).parent

if __name__ == "__main__":
    counts = task.make_files(HERE / "arith")
    for name, n in counts.items():
        print(f"data/arith/{name}: {n} rows")
    builtin.build_tokenizer().save_pretrained(str(builtin.TOKENIZER_DIR))
    print(f"{builtin.TOKENIZER_DIR}: tokenizer saved")
