"""How often the live-reward rollback fires by chance, and how often on a real drop, by
`STROP_ROLLBACK_MIN_SAMPLES`.

The rule (learner/rollback.py `check`): after a promotion, once the new version and the one
it replaced each have `min_samples` rewards, the new version is rolled back if its mean
live reward is below its predecessor's by more than `margin`. The learner checks every few
seconds, so the rule looks again after every group that arrives until the next promotion.

The live reward is per completion, but completions of one group share a prompt: their
rewards rise and fall together. 20 rewards are 2-3 prompts. This replays real groups (a
dump of a learning arm's groups stream: version and rewards of each) through the rule:

- null: predecessor and new version draw their groups from the same version's pool (an
  unchanged model); every rollback is a false one;
- drop: the predecessor draws from the late versions' pools, the new version from the
  early ones' (a version that lost the arm's gain in live reward);

for each `min_samples`, with the predecessor's window at `--previous-groups` groups and the
new version watched for `--new-groups` groups (about one version's worth: the next
promotion ends the watch).

Prints a table, writes bench/results/rollback.json.

    python bench/rollback.py [--groups bench/results/group-rewards-oracle60.json] [--draws 20000]
"""

import argparse
import json
import random
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from strop.settings import Settings  # noqa: E402

MIN_SAMPLES = (20, 32, 64, 96, 128)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=Path, default=HERE / "results/group-rewards-oracle60.json")
    p.add_argument("--draws", type=int, default=20_000)
    p.add_argument("--margin", type=float, default=Settings().rollback_margin)
    p.add_argument("--previous-groups", type=int, default=19)
    p.add_argument("--new-groups", type=int, default=16)
    p.add_argument("--versions-per-hour", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results/rollback.json")
    return p.parse_args()


def rolled_back(
    rng: random.Random,
    previous_pool: list[list[float]],
    new_pool: list[list[float]],
    min_samples: int,
    margin: float,
    previous_groups: int,
    new_groups: int,
) -> int | None:
    """Replay one promotion: the number of the new version's groups after which the rule
    rolled it back, or None if it never did within the watch."""
    previous = [x for _ in range(previous_groups) for x in rng.choice(previous_pool)]
    previous_mean = sum(previous) / len(previous)
    total = n = 0
    for k in range(1, new_groups + 1):
        group = rng.choice(new_pool)
        total, n = total + sum(group), n + len(group)
        # learner/rollback.py `check`, looked at again after every group
        if n >= min_samples and len(previous) >= min_samples and previous_mean - total / n > margin:
            return k
    return None


def main() -> None:
    args = parse()
    dump = json.loads(args.groups.read_text())
    by_version: dict[str, list[list[float]]] = defaultdict(list)
    for g in dump["groups"]:
        by_version[g["version"]].append(g["rewards"])
    # versions in the order they served; pools big enough to draw a version's worth from
    order = sorted(by_version, key=lambda v: -1 if v == "base" else int(v[1:]))
    pools = [by_version[v] for v in order if len(by_version[v]) >= args.new_groups]
    early = [g for pool in pools[:2] for g in pool]
    late = [g for pool in pools[-3:] for g in pool]

    def mean(groups: list[list[float]]) -> float:
        return sum(map(sum, groups)) / sum(map(len, groups))

    print(
        f"{len(dump['groups'])} groups of {len(order)} versions; {len(pools)} pools of at "
        f"least {args.new_groups} groups; early pools' live reward {mean(early):.3f}, late "
        f"{mean(late):.3f}; margin {args.margin}"
    )
    rng = random.Random(args.seed)
    rows = []
    for ms in MIN_SAMPLES:
        rule = dict(
            min_samples=ms,
            margin=args.margin,
            previous_groups=args.previous_groups,
            new_groups=args.new_groups,
        )
        null = [rolled_back(rng, p, p, **rule) for p in rng.choices(pools, k=args.draws)]
        drop = [rolled_back(rng, late, early, **rule) for _ in range(args.draws)]
        false_rate = sum(k is not None for k in null) / args.draws
        caught = [k for k in drop if k is not None]
        rows.append(
            {
                "min_samples": ms,
                "false_rollback_per_version": false_rate,
                "false_rollback_per_hour": 1 - (1 - false_rate) ** args.versions_per_hour,
                "drop_caught": len(caught) / args.draws,
                "drop_groups_to_catch_median": sorted(caught)[len(caught) // 2] if caught else None,
            }
        )
    print(
        "\n| min samples | groups | false rollback, per version | per hour "
        f"({args.versions_per_hour} versions) | drop caught | groups until caught (median) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['min_samples']} | {r['min_samples'] / 8:.1f} | "
            f"{r['false_rollback_per_version']:.3f} | {r['false_rollback_per_hour']:.2f} | "
            f"{r['drop_caught']:.3f} | {r['drop_groups_to_catch_median']} |"
        )
    args.out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": dump.get("source"),
                "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "early_mean": mean(early),
                "late_mean": mean(late),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
