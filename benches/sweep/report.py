#!/usr/bin/env python3
"""Tabulates sweep runs: for each run folder, the mean JPEG size (kB) of the first epoch's samples,
of the last epoch's, the relative change, the epochs done and the wall time (sum of the per-epoch
sampling, reward and training seconds in metrics.jsonl), as a Markdown table.

    python3 benches/sweep/report.py runs/sweep-compressibility/*/
"""
import json
import pathlib
import sys


def summarise(run: pathlib.Path):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if not rows:
        return None
    kb = [abs(r.get("reward/jpeg_kb", r["reward_mean"])) for r in rows]
    seconds = sum(r["seconds_sampling"] + r["seconds_reward"] + r["seconds_training"] for r in rows)
    # Smooth the ends over up to 3 epochs: one epoch's 32 samples are noisy.
    k = min(3, len(kb))
    first, last = sum(kb[:k]) / k, sum(kb[-k:]) / k
    return run.name, first, last, 100.0 * (last - first) / first, len(rows), seconds / 60.0


def main(paths):
    print("| run | JPEG kB (first epochs) | JPEG kB (last epochs) | change | epochs | minutes |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        s = summarise(pathlib.Path(p))
        if s:
            print("| {} | {:.3f} | {:.3f} | {:+.1f}% | {} | {:.1f} |".format(*s))


if __name__ == "__main__":
    main(sys.argv[1:])
