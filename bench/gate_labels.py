"""How many probe prompts the gate's label-free check can use, by probe answer length.

The gate's vote check (learner/gate.py `vote_labels`) labels a probe prompt only where
the parent's sampled answers (T=1) agree on a final answer; with fewer than
`STROP_GATE_VOTE_MIN_PROMPTS` labelled prompts it is skipped. This samples base
(SmolLM2-135M-Instruct, plain `generate`, no service) on the first `--prompts` prompts of
the learning benchmark's stream, 8 votes and one greedy answer each, at several answer
lengths, and counts the prompts labelled, the labels that are right, and the greedy
answers that agree with their label.

Prints a table, writes bench/results/gate_labels.json.

    python bench/gate_labels.py [--prompts 48] [--votes 8] [--tokens 32,64,96]
"""

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from judge import same_answer  # noqa: E402
from learner.gate import agrees, vote_labels  # noqa: E402
from ops.questions import make_learning_set  # noqa: E402
from strop.model import load_model  # noqa: E402
from strop.settings import Settings  # noqa: E402


def sample(model, tok, prompts: list[str], n: int, max_new: int, greedy: bool) -> list[list[str]]:
    """`n` answers to each prompt (T=1, or greedy), decoded."""
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new,
            do_sample=not greedy,
            temperature=1.0,
            top_p=1.0,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
        )
    decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [decoded[i * n : (i + 1) * n] for i in range(len(prompts))]


def load_base():
    """Base (the default model) on the CPU, padded on the left for batched `generate`,
    with torch's seed set."""
    s = Settings()
    model, tok = load_model(s.model, s.model_cache_dir, "cpu")
    tok.padding_side = "left"
    torch.manual_seed(0)
    return model, tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--votes", type=int, default=8)
    p.add_argument("--tokens", default="32,64,96")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gate_labels.json")
    args = p.parse_args()
    model, tok = load_base()
    questions = make_learning_set(400, 0, "stream")[: args.prompts]
    prompts = [q.prompt for q in questions]
    print("| answer tokens | prompts labelled | labels right | greedy agrees | seconds |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for length in (int(t) for t in args.tokens.split(",")):
        t = time.time()
        votes: list[list[str]] = []
        greedy: list[str] = []
        for i in range(0, len(prompts), 8):
            batch = prompts[i : i + 8]
            votes += sample(model, tok, batch, args.votes, length, greedy=False)
            greedy += [g[0] for g in sample(model, tok, batch, 1, length, greedy=True)]
        labels = vote_labels(prompts, votes)
        right = sum(
            label is not None and same_answer(label, q.answer)
            for label, q in zip(labels, questions, strict=True)
        )
        agree = sum(agrees(prompts, labels, greedy))
        n = sum(label is not None for label in labels)
        seconds = time.time() - t
        print(f"| {length} | {n}/{len(prompts)} | {right} | {agree} | {seconds:.0f} |", flush=True)
        rows.append(
            {"tokens": length, "labelled": n, "right": right, "agree": agree, "seconds": seconds}
        )
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {"prompts": args.prompts, "votes": args.votes},
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
