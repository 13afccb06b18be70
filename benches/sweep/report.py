#!/usr/bin/env python3
"""Tabulates sweep runs: for each run folder, its settings (from config.json), the mean JPEG size
(kB) of the first epochs' samples and of the last epochs', the relative change, the epochs done
and the wall time (sum of the per-epoch sampling, reward and training seconds in metrics.jsonl),
as a Markdown table.

    python3 benches/sweep/report.py runs/sweep-compressibility/*/
    python3 benches/sweep/report.py --epochs 20 RUN/     # only the first 20 epochs of a run

Settings a run's config.json lacks come from engine versions before the option existed:
text encoder trained, no warm-up, every step trained, the model's x0 clamp, no range penalty.
"""
import json
import pathlib
import sys


def settings(run: pathlib.Path) -> str:
    c = json.loads((run / "config.json").read_text())
    t = c["train"]
    norm = t["normalisation"]
    parts = [
        t["algorithm"],
        f"lr {t['optimizer']['lr']:g}",
        f"clip {t['clip_range']:g}",
        f"{t['sampler']['steps']} steps",
        f"{t['samples_per_epoch']} samples",
    ]
    if t["inner_epochs"] != 1:
        parts.append(f"inner {t['inner_epochs']}")
    if t["train_batch_size"] != 8:
        parts.append(f"train batch {t['train_batch_size']}")
    if isinstance(norm, dict):
        parts.append(f"min count {norm['PerPrompt']['min_count']}")
    else:
        parts.append("batch-normalised")
    if c.get("lora"):
        parts.append(f"LoRA {c['lora']['rank']}")
    parts.append("clamp " + ("off" if c.get("clip_sample") is False else "on"))
    parts.append(f"warm-up {t['optimizer'].get('warmup_steps', 0)}")
    parts.append(f"min sigma {t.get('min_train_sigma', 0):g}")
    parts.append("text encoder " + ("trained" if t.get("train_text_encoder", True) else "frozen"))
    parts.append(f"range penalty {t.get('range_penalty', 0):g}")
    return ", ".join(parts)


def summarise(run: pathlib.Path, epochs=None):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = rows[:epochs]
    if not rows:
        return None
    kb = [abs(r.get("reward/jpeg_kb", r["reward_mean"])) for r in rows]
    seconds = sum(r["seconds_sampling"] + r["seconds_reward"] + r["seconds_training"] for r in rows)
    # Smooth the ends over up to 3 epochs: one epoch's 32 samples are noisy.
    k = min(3, len(kb))
    first, last = sum(kb[:k]) / k, sum(kb[-k:]) / k
    return run.name, settings(run), first, last, 100.0 * (last - first) / first, len(rows), seconds / 60.0


def main(args):
    epochs = None
    if args[:1] == ["--epochs"]:
        epochs, args = int(args[1]), args[2:]
    print("| run | settings | JPEG kB (first 3 epochs) | JPEG kB (last 3 epochs) | change | epochs | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for p in args:
        s = summarise(pathlib.Path(p), epochs)
        if s:
            print("| {} | {} | {:.3f} | {:.3f} | {:+.1f}% | {} | {:.1f} |".format(*s))


if __name__ == "__main__":
    main(sys.argv[1:])
