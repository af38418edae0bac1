"""`.ci/run` is the README's test command, so what CI proves is what a newcomer runs."""

from __future__ import annotations

import re

from helpers import REPO


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"Install and run the tests:\n\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README: no 'Install and run the tests:' command block"
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")][-1]
    assert ci.replace("pip install -q ", "pip install ") == block.group(1).strip()
    assert "bash .ci/run-vllm" in ci  # the vLLM backend's tests run in CI, in their own environment
