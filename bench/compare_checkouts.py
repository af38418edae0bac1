"""Before/after in ONE interleaved run: bench_dpo.py / bench_sft.py (part b) children of two align checkouts and TRL.

    OMP_NUM_THREADS=1 python bench/compare_checkouts.py --before /work/main --bench dpo \
        [--system align-defaults --peer trl-defaults --pairs 128 --max-length 512 --reps 2]
    OMP_NUM_THREADS=1 python bench/compare_checkouts.py --before /work/main --bench sft \
        [--system align-padded --peer trl --rows 96 --max-length 512 --reps 2]

Each measurement is the bench's own child (its own process, its own timing and peak memory:
bench_dpo.py's `peak MB` is the resident high-water mark minus the resident set after
transformers' imports, its `process peak` the whole process's; bench_sft.py's the
high-water mark after its imports and what the run added), run from `--before`'s bench/
with that checkout on PYTHONPATH ("before"), from this checkout ("after"), and the peer
(TRL, from this checkout). The order rotates each rep and a 512x512 matmul probe runs
before and after each (bench/common.py); ratios are taken within a rep, and reps whose
probes say the machine was throttled are marked.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, machine_load, probe, run_child  # noqa: E402, I001

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the other align checkout (its bench/ and align/)")
    parser.add_argument("--bench", choices=["dpo", "sft"], required=True)
    parser.add_argument("--system", help="align's system in that bench (default align-defaults / align-padded)")
    parser.add_argument("--peer", help="TRL's system (default trl-defaults / trl)")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    dpo = args.bench == "dpo"
    system = args.system or ("align-defaults" if dpo else "align-padded")
    peer = args.peer or ("trl-defaults" if dpo else "trl")
    before = Path(args.before).resolve()
    runs = {"before": (before, system), "after": (HERE, system), peer: (HERE, peer)}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(HERE / "bench"))
        if dpo:
            import bench_dpo

            n = bench_dpo.prepare(work, args.pairs, args.max_length)
            print(f"DPO: {n} HH-RLHF pairs, batch {args.batch}, max length {args.max_length}; {machine_load()}")
        else:
            import bench_sft

            ns = argparse.Namespace(seq=256, a_warmup=0, a_steps=1, batch=args.batch, b_rows=args.rows,
                                    max_length=args.max_length)
            info = bench_sft.prepare(work, ns)
            steps = info["b_steps"][system]
            print(f"SFT: {info['b_samples']} HH-RLHF dialogues, {info['b_tokens']} tokens, batch {args.batch}, "
                  f"{steps} align steps; {machine_load()}")

        def argv_env(label):
            root, name = runs[label]
            script = root / "bench" / ("bench_dpo.py" if dpo else "bench_sft.py")
            env = child_env(PYTHONPATH=str(root), HF_DATASETS_CACHE=str(work / f"hf-{label}"))
            if dpo:
                argv = [str(script), "--child", name, "--work", str(work), "--batch", str(args.batch),
                        "--max-length", str(args.max_length), "--beta", "0.1"]
            else:
                argv = [str(script), "--work", str(work), "--batch", str(args.batch), "--b-rows", str(args.rows),
                        "--max-length", str(args.max_length), "--child", f"b:{name}", "--b-steps", str(steps)]
            return argv, env

        labels = list(runs)
        results = {label: [] for label in labels}
        for rep in range(args.reps):
            for label in labels[rep % 3:] + labels[: rep % 3]:
                lo = probe()
                r = run_child(*argv_env(label))
                hi = probe()
                if r is None:
                    continue
                peak = r["peak_rss_mb"] if dpo else r["peak_mb"]
                r.update(rep=rep, probes=(lo, hi), process_peak=peak)
                results[label].append(r)
                print(f"rep {rep} {label:14s} {r['seconds']:7.1f} s  process peak {peak:6.0f} MB  "
                      f"probe {lo:.0f}/{hi:.0f} GFLOP/s; {machine_load()}", flush=True)
        best = max(p for rs in results.values() for r in rs for p in r["probes"])
        print(f"\nper rep (clean: every probe of the rep >= 50% of the best, {best:.0f} GFLOP/s):")
        for rep in range(args.reps):
            row = {label: next((r for r in results[label] if r["rep"] == rep), None) for label in labels}
            if any(r is None for r in row.values()):
                continue
            clean = all(min(r["probes"]) >= 0.5 * best for r in row.values())
            t, m = row[peer]["seconds"], row[peer]["process_peak"]
            print(f"  rep {rep} ({'clean' if clean else 'throttled'}): " + "; ".join(
                f"{label} {t / row[label]['seconds']:.2f}x {peer}'s speed, {row[label]['process_peak'] / m:.2f}x its "
                f"process peak ({row[label]['process_peak']:.0f} vs {m:.0f} MB)" for label in ("before", "after")))
        print(f"finished; {machine_load()}")
        assert not math.isnan(best)


if __name__ == "__main__":
    main()
