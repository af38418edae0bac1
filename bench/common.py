"""Shared pieces of the benchmarks in `bench/`: a throttling probe, child processes,
an interleaved A/B runner that discards throttled rounds, peak-memory readings and
ratio tables.

The host of this machine throttles it without warning (a 512x512 matmul falls from
hundreds to tens of GFLOP/s for minutes) and other jobs share its cores, so every
benchmark here follows the same protocol:

1. each measurement runs in its own fresh process (`run_child`), with
   OMP_NUM_THREADS=1 and `torch.set_num_threads(1)` (`setup_child`), so memory and
   caches do not leak between systems;
2. systems are measured in rounds, one measurement of each per round, in an order that
   rotates every round (`interleaved`);
3. a short matmul probe (`probe`) runs before and after every measurement; a round in
   which any probe falls below `throttle` x the best probe seen so far is discarded and
   run again (at most `retries` times), and rounds that the final best probe shows to
   be throttled are left out of the summary (all rounds are used if none is clean);
4. ratios are paired: each round's value of a system divided by the same round's value
   of the baseline, then the median over rounds (`print_table`).

Usage from a benchmark script (`sys.path` holds `bench/` when a script in it runs):

    from common import emit, interleaved, print_table, run_child, setup_child
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------------
# probe and machine state
# ---------------------------------------------------------------------------
def probe(seconds: float = 0.2, size: int = 512) -> float:
    """GFLOP/s of a (size x size) float32 matmul loop run for `seconds` on one thread."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # first call allocates
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def machine_load() -> str:
    """One line: load averages and cores (to print with the figures)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


# ---------------------------------------------------------------------------
# memory (Linux /proc; CUDA peak on a GPU)
# ---------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    """A /proc/self/status memory field in MB (VmRSS: resident now; VmHWM: resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> float:
    """Reset the resident high-water mark (Linux clear_refs) and return the resident set now, in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_mb("VmRSS")


def memory_after(base_mb: float) -> dict:
    """Peak memory since `reset_peak_rss()` returned `base_mb`: the process peak and what the work added."""
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mb": peak, "added_mb": peak, "base_mb": 0.0}
    peak = rss_mb("VmHWM")
    return {"peak_mb": peak, "added_mb": peak - base_mb, "base_mb": base_mb}


# ---------------------------------------------------------------------------
# per-step time of a transformers Trainer (TRL)
# ---------------------------------------------------------------------------
def step_stamps():
    """-> (a TrainerCallback, its list of perf_counter stamps): the first step's start, then every step's end;
    consecutive differences are the step times."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    return Stamp(), stamps


# ---------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------
def child_env(**extra: str) -> dict:
    """Environment of a measured child: one thread, no hub, quiet libraries."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def setup_child() -> None:
    """First thing a measured child does: one torch thread (OMP_NUM_THREADS is set by child_env)."""
    import torch

    torch.set_num_threads(1)


def emit(result: dict) -> None:
    """A child's last word: one line the parent parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: list[str], env: dict | None = None, timeout: float | None = None) -> dict | None:
    """Run `python argv...` and return the dict it `emit`ted, or None (printing its stderr tail) on failure."""
    try:
        proc = subprocess.run([sys.executable, *argv], env=env or child_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  child {argv[1:]} timed out after {timeout} s", flush=True)
        return None
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        print(f"  child {argv[1:]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def rotating_reps(systems: list[str], reps: int, argv_of: Callable[[int, str], list[str]], env: dict,
                  describe: Callable[[str, dict], str]) -> dict[str, list[dict]]:
    """Each rep runs every system once in its own child (order rotating), a probe before and after each.

    The simpler protocol of bench_reward/bench_dpo (no retries): results keep `probe_before`
    and `probe_after`; pick the clean ones with `probe_clean(results)`.
    """
    results = {s: [] for s in systems}
    for rep in range(reps):
        for system in systems[rep % len(systems):] + systems[: rep % len(systems)]:
            before = probe()
            result = run_child(argv_of(rep, system), env=env)
            after = probe()
            if result is None:
                continue
            result.update(probe_before=before, probe_after=after)
            results[system].append(result)
            print(f"rep {rep} {system:15s} {describe(system, result)}  probe {before:.0f}/{after:.0f} GFLOP/s",
                  flush=True)
    return results


def probe_clean(results: dict[str, list[dict]]) -> Callable[[dict], bool]:
    """A run is clean when both its probes are >= 50% of the best probe seen and within 25% of each other."""
    probes = [r[k] for rs in results.values() for r in rs for k in ("probe_before", "probe_after")]
    best = max(probes) if probes else 0.0

    def clean(r: dict) -> bool:
        lo, hi = sorted((r["probe_before"], r["probe_after"]))
        return lo >= 0.5 * best and hi <= 1.25 * lo

    return clean


# ---------------------------------------------------------------------------
# the interleaved runner
# ---------------------------------------------------------------------------
def interleaved(systems: list[str], measure: Callable[[str], dict | None], *, rounds: int,
                throttle: float = 0.6, retries: int = 2, probe_seconds: float = 0.2,
                show: Callable[[str, dict], str] | None = None) -> list[dict[str, dict]]:
    """Measure every system once per round, `rounds` times; returns the kept rounds.

    `measure(system)` runs one measurement (normally in a child process) and returns a
    dict of figures, or None on failure. Each record gets `probe_before`/`probe_after`
    (GFLOP/s). The order of systems rotates every round. A round with a probe below
    `throttle` x the best probe seen so far, or with a failed measurement, is discarded and
    run again, at most `retries` times; the last try is kept (marked) if all tries were
    throttled. Each kept round is marked `clean` against the best probe of the whole run.
    `show(system, record)` formats a progress line's figures.
    """
    best = 0.0
    kept: list[dict[str, dict]] = []
    for r in range(rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        for attempt in range(retries + 1):
            records, failed = {}, False
            for system in order:
                before = probe(probe_seconds)
                record = measure(system)
                after = probe(probe_seconds)
                best = max(best, before, after)
                if record is None:
                    failed = True
                    print(f"round {r} try {attempt} {system:20s} FAILED", flush=True)
                    break
                record.update(probe_before=before, probe_after=after)
                records[system] = record
                figures = show(system, record) if show else ""
                print(f"round {r} try {attempt} {system:20s} {figures}  probe {before:.0f}/{after:.0f} GFLOP/s",
                      flush=True)
            if failed:
                continue
            low = min(min(x["probe_before"], x["probe_after"]) for x in records.values())
            if low >= throttle * best or attempt == retries:
                if low < throttle * best:
                    print(f"round {r}: still throttled after {retries} retries; kept, marked", flush=True)
                kept.append(records)
                break
            print(f"round {r}: probe {low:.0f} < {throttle:.0%} of best {best:.0f} GFLOP/s: throttled, "
                  f"discarded and retried", flush=True)
    for records in kept:
        low = min(min(x["probe_before"], x["probe_after"]) for x in records.values())
        for x in records.values():
            x["clean"] = low >= throttle * best
    return kept


def clean_rounds(rounds: list[dict[str, dict]]) -> list[dict[str, dict]]:
    """The rounds not throttled against the best probe of the run (all of them if none is clean)."""
    clean = [r for r in rounds if all(x.get("clean", True) for x in r.values())]
    return clean or rounds


# ---------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------
def paired_ratios(rounds: list[dict[str, dict]], key: str, system: str, baseline: str) -> list[float]:
    """system/baseline of `key`, one ratio per round that measured both."""
    return [r[system][key] / r[baseline][key] for r in rounds
            if system in r and baseline in r and r[baseline][key]]


def print_table(rounds: list[dict[str, dict]], key: str, baseline: str, *, unit: str = "s",
                memory: bool = False, title: str = "") -> dict[str, float]:
    """Per system: median and best of `key`, the median paired ratio to `baseline` (with its range),
    and with `memory` the median peak and added memory. Returns {system: median paired ratio}."""
    use = clean_rounds(rounds)
    systems = list(dict.fromkeys(s for r in use for s in r))
    if title:
        n_clean = sum(all(x.get("clean", True) for x in r.values()) for r in rounds)
        note = "" if n_clean else "; none clean, so all are used: treat the figures as noisy"
        print(f"\n{title}  ({n_clean} of {len(rounds)} rounds clean{note})")
    head = f"{'system':22s} {'median ' + unit:>12s} {'best ' + unit:>10s}   {'x ' + baseline + ' (paired)':>26s}"
    if memory:
        head += f" {'peak MB':>9s} {'added MB':>9s}"
    print(head)
    ratios = {}
    for system in systems:
        values = [r[system][key] for r in use if system in r]
        pr = paired_ratios(use, key, system, baseline)
        ratios[system] = statistics.median(pr) if pr else float("nan")
        span = f"[{min(pr):.3f}-{max(pr):.3f}]" if pr else ""
        line = (f"{system:22s} {statistics.median(values):12.4g} {min(values):10.4g}   "
                f"{ratios[system]:10.3f}x {span:>15s}")
        if memory:
            peaks = [r[system]["peak_mb"] for r in use if system in r]
            added = [r[system]["added_mb"] for r in use if system in r]
            line += f" {statistics.median(peaks):9.0f} {statistics.median(added):9.0f}"
        print(line)
    return ratios
