"""Log-prob scoring benchmark: the learner's `token_logps` against the textbook way.

The learner scores completions three times per GRPO step: under the base model (the KL
reference), under the version that sampled the group (the behaviour policy), both without
gradients, and under the policy with gradients. Side by side in one process, on the
default model (SmolLM2-135M-Instruct, strop's LoRA), fp32 on this machine's cores:

- `full`: every position through the LM head, a float32 log-softmax over the whole
  `(rows, T, vocab)`, then the completion tokens picked out (what the learner did up to
  9acf1b2's parent, and what most code does);
- `strop`: `learner.logprobs.token_logps`: the prompt prefix the rows share runs once,
  and only completion positions go through the LM head's log-softmax.

Two batches: a GRPO group (one prompt, 8 sampled completions, the small-cpu default's
step) and 8 completions of 4 different prompts (only the chat template's first tokens
shared). Completion lengths are drawn once, up to the small-cpu 96-token limit. Wall and
CPU seconds of a no-grad pass and of a forward + backward pass; a step is two of the
first and one of the second. Arms alternate; medians of `--repeats` after one warm-up.
Prints a table; writes bench/results/logprobs.json.

    python bench/logprobs.py [--repeats 5]
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from learner.logprobs import build_batch, token_logps  # noqa: E402
from strop.model import default_model_dir  # noqa: E402
from strop.settings import get_settings  # noqa: E402

PROMPTS = [
    "A baker fills 17 trays with 6 rolls each and sells 39 rolls. How many rolls are left?",
    "What is 48 + 27?",
    "What is the capital of Peru? Reply with 'The answer is' and the answer.",
    "Tom has 5 boxes of 12 pencils. He gives away 23 pencils. How many does he keep?",
]


def full_logps(model, batch: dict) -> torch.Tensor:
    """Every position's float32 log-softmax over the vocabulary, completion tokens picked."""
    ids, completion = batch["input_ids"], batch["completion_mask"]  # (B, T)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    picked = torch.gather(logps, 2, ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    picked = torch.nn.functional.pad(picked, (1, 0))  # (B, T)
    return picked.masked_fill(completion == 0, 0.0)  # (B, T)


def batches(tokenizer, seed: int = 0) -> dict[str, dict]:
    """The two batches, with completion lengths drawn once (random tokens: only the
    shapes matter for time)."""
    rng = random.Random(seed)
    lengths = [min(96, rng.randint(12, 130)) for _ in range(8)]  # about 1 in 4 cut at 96
    completions = [[rng.randrange(100, 30000) for _ in range(n)] for n in lengths]
    ended = [n < 96 for n in lengths]

    def messages(prompt: str) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    group = [messages(PROMPTS[0])] * 8
    mixed = [messages(PROMPTS[i // 2]) for i in range(8)]
    return {
        "GRPO group (1 prompt x 8)": build_batch(tokenizer, group, completions, 1024, ended),
        "4 prompts x 2": build_batch(tokenizer, mixed, completions, 1024, ended),
    }


def timed(fn, model, batch: dict, grad: bool) -> tuple[float, float]:
    """(wall s, CPU s) of one pass: no-grad, or forward + backward."""
    wall, cpu = time.perf_counter(), time.process_time()
    if grad:
        fn(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            fn(model, batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    s = get_settings()
    torch.manual_seed(0)
    path = default_model_dir(s.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(
        r=s.lora_rank,
        lora_alpha=s.lora_alpha,
        target_modules=list(s.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    arms = {"full": full_logps, "strop": token_logps}
    results: dict = {"threads": torch.get_num_threads(), "repeats": args.repeats, "batches": {}}
    for name, batch in batches(tokenizer).items():
        with torch.no_grad():
            diff = (full_logps(model, batch) - token_logps(model, batch)).abs().max().item()
        runs: dict[str, dict[str, list]] = {a: {"no_grad": [], "grad": []} for a in arms}
        for i in range(args.repeats + 1):  # the first round warms up and is dropped
            for arm in arms if i % 2 == 0 else list(arms)[::-1]:
                for kind in ("no_grad", "grad"):
                    runs[arm][kind].append(timed(arms[arm], model, batch, kind == "grad"))
        row: dict = {
            "rows": int(batch["input_ids"].shape[0]),
            "T": int(batch["input_ids"].shape[1]),
            "completion_tokens": int(batch["completion_mask"].sum()),
            "max_abs_diff": diff,
        }
        for arm, kinds in runs.items():
            for kind, values in kinds.items():
                row[f"{arm}_{kind}_wall_s"] = statistics.median(w for w, _ in values[1:])
                row[f"{arm}_{kind}_cpu_s"] = statistics.median(c for _, c in values[1:])
                row[f"{arm}_{kind}_runs"] = values
            row[f"{arm}_step_wall_s"] = 2 * row[f"{arm}_no_grad_wall_s"] + row[f"{arm}_grad_wall_s"]
        row["step_speedup"] = row["full_step_wall_s"] / row["strop_step_wall_s"]
        results["batches"][name] = row
        print(f"  {name}: done", flush=True)

    out = ROOT / "bench" / "results" / "logprobs.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n| batch | arm | no-grad pass (s) | forward + backward (s) | GRPO step (s) |")
    print("|---|---|---:|---:|---:|")
    for name, r in results["batches"].items():
        for arm in arms:
            print(
                f"| {name} ({r['rows']} rows, T={r['T']}, {r['completion_tokens']} completion "
                f"tokens) | {arm} | {r[f'{arm}_no_grad_wall_s']:.2f} | {r[f'{arm}_grad_wall_s']:.2f}"
                f" | {r[f'{arm}_step_wall_s']:.2f} |"
            )
    for name, r in results["batches"].items():
        print(
            f"{name}: step {r['step_speedup']:.2f}x faster; largest log-prob difference "
            f"{r['max_abs_diff']:.1e}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
