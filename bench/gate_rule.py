"""How often the gate's label-free vote check refuses a candidate, by rule and probe size.

The check (learner/gate.py `vote_verdict`) compares, on labelled probe prompts, how many
greedy answers of the candidate and of its parent match the prompts' vote labels. Every
probe prompt carries a label since the gate reads them from the worker's groups, so a
probe of 8 gives 8 labels, and chance alone decides some prompts: this measures how
often each rule refuses a candidate that is barely changed, and one that is damaged.

Base (SmolLM2-135M-Instruct, plain `generate`, seeded) samples `--votes` answers (T=1,
`--vote-tokens`) to the first `--prompts` prompts of the learning stream; `vote_labels`
labels some of them: that is the pool. 32-token votes by default: base's 32-token greedy
answers then match 40% of the labels, inside what the parents matched in the learning
runs' gates (2-7 of 8); against 96-token votes (the worker's) base's greedy answers, cut at 32 tokens,
match almost none, and no rule could refuse anything. Base is the parent; the
candidates are LoRAs with random weights (q/v, rank 8) at several scales and seeds, each
answering the pool greedily (32 tokens, as the gate), with its KL to base on base's
greedy answers. Then `--draws` random probes of each size are drawn from the pool, and
for each rule the share of probes on which it refuses.

Rules: `count` refuses when the candidate matches on more than 1 prompt fewer (the
gate's rule, `STROP_GATE_VOTE_TOLERANCE` 1); `sign` refuses when, of the D prompts where exactly one
side matches, the candidate loses so many that a fair coin per prompt would do it with
probability at most `alpha` (a one-sided sign test).

Prints a table, writes bench/results/gate_rule.json.

    python bench/gate_rule.py [--prompts 240] [--votes 8] [--vote-tokens 32] [--draws 4000]
"""

import argparse
import json
import math
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gate_labels import load_base, sample  # noqa: E402
from learner.gate import agrees, vote_labels, vote_verdict  # noqa: E402
from ops.questions import make_learning_set  # noqa: E402

SCALES = [(s, seed) for s in (0.25, 0.35, 0.5, 0.75) for seed in (0, 1, 2)] + [(1.0, 0), (8.0, 0)]
SIZES = [8, 16]
ALPHAS = [0.125, 0.0625]


def with_random_lora(model, seed: int, scale: float):
    """`model` with a LoRA of random weights (q/v, rank 8) times `scale`, as PEFT wraps it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    return peft


@torch.no_grad()
def kl_to_base(peft, tok, prompts: list[str], answers: list[str]) -> float:
    """Mean per-token KL(candidate || base) over base's greedy answers, as the gate's."""
    total, tokens = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        head = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )
        if not isinstance(head, list):  # a BatchEncoding in newer transformers
            head = head["input_ids"]
        tail = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([head + tail])
        cand = torch.log_softmax(peft(input_ids=ids).logits[0, len(head) - 1 : -1].float(), -1)
        with peft.disable_adapter():
            base = torch.log_softmax(peft(input_ids=ids).logits[0, len(head) - 1 : -1].float(), -1)
        total += (cand.exp() * (cand - base)).sum().item()
        tokens += len(tail)
    return total / max(tokens, 1)


def sign_test_p(lost: int, discordant: int) -> float:
    """Chance that a fair coin, tossed once per discordant prompt, loses at least `lost`
    of `discordant` tosses (a one-sided sign test; 1.0 with no discordant prompt)."""
    return sum(math.comb(discordant, k) for k in range(lost, discordant + 1)) / 2**discordant


def lost_won(parent: list[bool], cand: list[bool]) -> tuple[int, int]:
    """Prompts where only the parent matches its label, and where only the candidate does."""
    lost = sum(p and not c for p, c in zip(parent, cand, strict=True))
    won = sum(c and not p for p, c in zip(parent, cand, strict=True))
    return lost, won


def refuses(parent: list[bool], cand: list[bool], rule: str, alpha: float) -> bool:
    """The vote check's verdict on one probe, by `rule` (`count`: the gate's own
    `vote_verdict` at its default tolerance of 1 prompt)."""
    if rule == "count":
        reason, _ = vote_verdict(len(parent), sum(parent), sum(cand), tolerance=1, min_prompts=3)
        return reason is not None
    lost, won = lost_won(parent, cand)
    return lost > won and sign_test_p(lost, lost + won) <= alpha


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=240)
    p.add_argument("--votes", type=int, default=8)
    p.add_argument("--vote-tokens", type=int, default=32)
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gate_rule.json")
    args = p.parse_args()
    model, tok = load_base()
    t0 = time.time()

    # --- the pool: prompts base's votes label, and base's greedy answers to them ---
    prompts = [q.prompt for q in make_learning_set(400, 0, "stream")[: args.prompts]]
    votes: list[list[str]] = []
    for i in range(0, len(prompts), 8):
        votes += sample(model, tok, prompts[i : i + 8], args.votes, args.vote_tokens, greedy=False)
        print(f"votes: {min(i + 8, len(prompts))}/{len(prompts)} prompts", flush=True)
    labels = vote_labels(prompts, votes)
    pool = [(q, label) for q, label in zip(prompts, labels, strict=True) if label is not None]
    pool_prompts, pool_labels = [q for q, _ in pool], [label for _, label in pool]

    def greedy(m) -> list[str]:
        out: list[str] = []
        for i in range(0, len(pool_prompts), 16):
            out += [g[0] for g in sample(m, tok, pool_prompts[i : i + 16], 1, 32, greedy=True)]
        return out

    base_answers = greedy(model)
    parent = agrees(pool_prompts, pool_labels, base_answers)
    print(f"pool: {len(pool)}/{len(prompts)} prompts labelled; base agrees on {sum(parent)}")

    # --- candidates: their answers, agreement and KL; then random probes of the pool ---
    rng = random.Random(0)
    rows = []
    for scale, seed in SCALES:
        peft = with_random_lora(model, seed, scale)
        cand = agrees(pool_prompts, pool_labels, greedy(peft))
        kl = kl_to_base(peft, tok, pool_prompts, base_answers)
        model = peft.unload()  # the base weights, untouched, for the next candidate
        lost, won = lost_won(parent, cand)
        row = {
            "scale": scale,
            "seed": seed,
            "kl": kl,
            "agree": sum(cand),
            "lost": lost,
            "won": won,
            "refused": {},
        }
        for size in [n for n in SIZES if n <= len(pool)]:
            draws = [rng.sample(range(len(pool)), size) for _ in range(args.draws)]
            for rule, alpha in [("count", 0.0)] + [("sign", a) for a in ALPHAS]:
                name = f"{rule}{'' if rule == 'count' else f'@{alpha:g}'}/{size}"
                n = sum(
                    refuses([parent[i] for i in d], [cand[i] for i in d], rule, alpha)
                    for d in draws
                )
                row["refused"][name] = n / args.draws
        rows.append(row)
        print(
            f"x{scale} seed {seed}: KL {kl:.4f}, agrees {row['agree']}/{len(pool)} "
            f"(lost {row['lost']}, won {row['won']}), refused: "
            + ", ".join(f"{k} {v:.3f}" for k, v in row["refused"].items()),
            flush=True,
        )

    names = list(rows[0]["refused"])
    print(f"\npool {len(pool)} labelled prompts, base agrees on {sum(parent)}")
    print("| candidate | KL to base | agrees | lost | won | " + " | ".join(names) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r['refused'][k]:.3f}" for k in names)
        print(
            f"| x{r['scale']:g} seed {r['seed']} | {r['kl']:.4f} | {r['agree']} | {r['lost']} "
            f"| {r['won']} | {cells} |"
        )
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": vars(args) | {"out": str(args.out)},
        "pool": len(pool),
        "base_agrees": sum(parent),
        "seconds": time.time() - t0,
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
