"""Noise floor of the learning benchmark: how far held-out pass@1 moves for weights that
do not change.

The learning issue's second target reads "over 10 consecutive versions, held-out pass@1
never falls more than 3 points below the best earlier version". Whether a run meets it
depends on the learner and on the ruler. This measures the ruler: it scores one version
(`--version`, base by default) `--repeats` times on the learning benchmark's held-out set
(`bench/learning.py`'s `score_version`: 8 samples per question at T=1), each time with
other seeds, and reports:

- the spread of pass@1 over the repeats (the same weights, other draws);
- from the per-question rates measured (all repeats pooled), a parametric bootstrap: the
  chance that 11 scorings of the unchanged version show a "dip" (one more than `--dip`
  below the best earlier one) somewhere in 10 consecutive versions, for held-out sets of
  40 to 640 questions with the same mix of per-question rates.

`bench/learning.py` scores every version with the same seeds (question i, seed i), which
couples versions whose answers stay alike; versions a few hundredths of KL apart sample
other tokens within the first few, so their scores are close to independent draws, and
the bootstrap's figure is the ruler's noise for them.

Prints a table, writes bench/results/noise.json.

    python bench/noise.py [--version base] [--adapter-dir DIR] [--repeats 5] [--held-out 40]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/learner.py must not hide learner/

from learning import SAMPLES, score_version, served  # noqa: E402

from ops.questions import make_learning_set  # noqa: E402

SIZES = (40, 80, 160, 320, 640)
TRIALS = 4000


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="base")
    p.add_argument("--adapter-dir", type=Path, help="where --version's adapter is (not base)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--held-out", type=int, default=40, help="as bench/learning.py's")
    p.add_argument("--seed", type=int, default=0, help="as bench/learning.py's")
    p.add_argument("--versions", type=int, default=11, help="scorings in one simulated run")
    p.add_argument("--dip", type=float, default=0.03)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "noise.json")
    return p.parse_args()


def dip_chance(rates: np.ndarray, size: int, versions: int, dip: float, rng) -> dict:
    """Over TRIALS simulated runs of an unchanged model on `size` questions drawn from
    `rates`: the sd of one scoring and the share of runs with a dip larger than `dip`."""
    dips, sds = 0, []
    for _ in range(TRIALS):
        p = rates if size == len(rates) else rng.choice(rates, size)
        scores = rng.binomial(SAMPLES, p, size=(versions, size)).mean(axis=1) / SAMPLES
        sds.append(scores.std(ddof=1))
        best = np.maximum.accumulate(scores)
        dips += bool((best[:-1] - scores[1:] > dip).any())
    return {"questions": size, "sd": float(np.mean(sds)), "p_dip": dips / TRIALS}


def main() -> None:
    args = parse()
    held = make_learning_set(args.held_out, args.seed, "held_out")
    work = Path(tempfile.mkdtemp(prefix="strop-noise-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STROP_")},
        "WORKDIR": str(work),
        "STROP_REDIS_PREFIX": f"bench-noise-{uuid.uuid4().hex[:6]}:",
        "STROP_ADAPTER_DIR": str(args.adapter_dir or work / "adapters"),
        "STROP_LOG_LEVEL": "WARNING",
    }
    runs = []
    with served(env) as client:
        for r in range(args.repeats):
            # seeds far from bench/learning.py's 0..n-1, and from each other repeat's
            row = score_version(client, args.version, held, seed=(r + 1) * 100_000)
            runs.append(row)
            print(f"repeat {r + 1}: pass@1 {row['pass1']:.3f} maj@8 {row['maj8']:.3f}", flush=True)
    passes = [row["pass1"] for row in runs]
    rates = np.array([sum(q) for q in zip(*(row["right"] for row in runs), strict=True)])
    rates = rates / (SAMPLES * args.repeats)
    rng = np.random.default_rng(args.seed)
    sims = [dip_chance(rates, n, args.versions, args.dip, rng) for n in SIZES]

    print(f"\n{args.version}, {args.repeats} scorings of {len(held)} questions x {SAMPLES}:")
    print(f"pass@1 {', '.join(f'{p:.3f}' for p in passes)}: sd {statistics.stdev(passes):.3f}, ")
    print(
        f"range {max(passes) - min(passes):.3f}; per-question rates pooled, mean {rates.mean():.3f}"
    )
    print(
        f"\n| held-out questions | sd of one scoring | P(a dip > {args.dip:.2f} in "
        f"{args.versions - 1} versions, unchanged model) |\n|---:|---:|---:|"
    )
    for s in sims:
        print(f"| {s['questions']} | {s['sd']:.3f} | {s['p_dip']:.2f} |")
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pass1": passes,
        "maj8": [row["maj8"] for row in runs],
        "rates": rates.tolist(),
        "bootstrap": sims,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
