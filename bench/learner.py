"""Learner benchmark: strop's DPO learner vs TRL's DPOTrainer, and promotion -> serving time.

Side by side in one run, on the default model (SmolLM2-135M-Instruct) on this machine:

- DPO optimizer steps per second and peak memory of strop's learner (the real loop:
  records read from Redis, `Learner.train_version`) and of TRL's `DPOTrainer`, on one
  fixed set of preference pairs generated here deterministically. Same LoRA (r=8,
  alpha=16, q/k/v/o), batch size, learning rate, grad clipping, fp32, no activation
  checkpointing, the same batches in the same order (TRL's sampler made sequential), and
  the same reference: the base model with the adapter disabled, computed every step
  (`precompute_ref_log_probs=False`). TRL's own defaults (activation checkpointing on)
  are run too, for reference.
  Each run is a fresh subprocess. Steps/s: `--steps` steps after `--warmup` ones, timed
  between optimizer-step ends; CPU s/step: the process's CPU time over the same steps
  (all threads), which other work on a shared machine barely moves. Memory: the process's peak RSS (VmHWM, reset through
  /proc/self/clear_refs once the model and trainer are set up) over the training steps,
  as the absolute peak and as the rise over the RSS before the first step.
- Promotion -> serving: a real `strop serve` process on the default model follows the
  registry; each round writes a version (AdapterStore: save, fsync, rename), registers
  and promotes it, while two clients send requests; the time until a response sent after
  the promotion names the version.

Runs alternate between the trainers and the figures are medians of `--repeats` runs.
Prints a table; writes bench/results/learner.json.

    python bench/learner.py [--repeats 3] [--steps 4] [--warmup 1] [--batch-size 4]
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LR, BETA, MAX_LEN = 5e-5, 0.1, 1024

SUBJECTS = [
    "photosynthesis", "the water cycle", "compound interest", "prime numbers", "volcanoes",
    "the French revolution", "black holes", "vaccines", "plate tectonics", "binary search",
    "the immune system", "supply and demand", "the printing press", "climate change",
    "neural networks", "the Roman empire",
]  # fmt: skip
STYLES = ["Explain {s} to a curious teenager.", "Give me a short summary of {s}."]
STYLES += ["What is the most important thing to know about {s}?", "Why does {s} matter?"]
FACTS = [
    "It starts from a simple idea and builds up step by step.",
    "Scientists studied it for many years before it was well understood.",
    "A good way to remember it is to think of an everyday example.",
    "It connects to many other topics in science and history.",
    "Its effects can be measured, and the measurements agree with the theory.",
    "People often misunderstand one detail, which is worth checking carefully.",
]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference pairs, the same on every run: a longer helpful answer is chosen over
    a short dismissive one."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        prompt = STYLES[(i // len(SUBJECTS)) % len(STYLES)].format(s=subject)
        facts = rng.sample(FACTS, 2)
        chosen = f"Here is an overview of {subject}. " + " ".join(facts)
        rejected = rng.choice(["I don't know.", "Look it up.", f"{subject}? Not sure."])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


# --- measuring a process's memory ---------------------------------------------------------


def rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, in KiB."""
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss, hwm


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


# --- one trainer run in this (fresh) process ----------------------------------------------


def child_strop(args, micro: int | None = None) -> dict:
    import redis
    import torch

    from learner.args import Args
    from learner.loop import build
    from strop.records import Keys, PreferencePair
    from strop.settings import Settings

    prefix = f"bench-learner-{uuid.uuid4().hex[:8]}:"
    tmp = tempfile.mkdtemp(prefix="strop-bench-")
    total = args.warmup + args.steps
    settings = Settings(
        redis_prefix=prefix,
        adapter_dir=Path(tmp) / "adapters",
        device="cpu",
        algorithm="dpo",
        batch_size=args.batch_size,
        steps_per_version=total,
        learning_rate=LR,
        dpo_beta=BETA,
        lora_rank=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_target_modules=LORA["target_modules"],
        gate_probe_size=1,
    )
    learner = build(
        settings,
        Args(
            settings,
            micro_batch_size=micro,
            max_len=MAX_LEN,
            gate_max_tokens=2,
            gate_judge_tokens=2,
        ),
    )
    r = redis.Redis.from_url(settings.redis_url)
    try:
        for p in make_pairs(total * args.batch_size):
            pair = PreferencePair(
                group_id=uuid.uuid4().hex,
                messages=[{"role": "user", "content": p["prompt"]}],
                chosen=p["chosen"],
                rejected=p["rejected"],
                chosen_reward=4.0,
                rejected_reward=1.0,
                version="base",
                method="judge",
            )
            r.xadd(Keys(prefix).pairs, pair.to_stream())
        learner.start()
        stamps, peaks = [], []
        step = learner.optimizer.step

        def timed_step(*a, **kw):
            out = step(*a, **kw)
            stamps.append((time.perf_counter(), time.process_time()))
            peaks.append(rss_kib()[1])
            return out

        learner.optimizer.step = timed_step
        torch.manual_seed(0)
        before = rss_kib()[0]
        reset_peak()
        learner.train_version()  # the steps, then save and a (minimal) gate, not timed
        return _result(stamps, peaks, before, args.warmup)
    finally:
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)


def child_trl(args, defaults: bool = False, micro: int | None = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from strop.model import load_model

    total = args.warmup + args.steps
    model, tok = load_model("smollm2", Path.home() / ".cache" / "strop" / "models", "cpu")
    rows = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in make_pairs(total * args.batch_size)
    ]
    stamps, peaks = [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_a, **_kw):
            stamps.append((time.perf_counter(), time.process_time()))
            peaks.append(rss_kib()[1])

    class InOrder(DPOTrainer):
        # the same batches as strop's learner, in the same order
        def _get_train_sampler(self, *_a, **_kw):
            return SequentialSampler(self.train_dataset)

    same = {} if defaults else {"gradient_checkpointing": False}
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=micro or args.batch_size,
        gradient_accumulation_steps=args.batch_size // (micro or args.batch_size),
        max_steps=total,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=MAX_LEN,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        **same,
    )
    trainer = InOrder(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(**LORA, lora_dropout=0.0, task_type="CAUSAL_LM"),
        callbacks=[Stamp()],
    )
    torch.manual_seed(0)
    before = rss_kib()[0]
    reset_peak()
    trainer.train()
    return _result(stamps, peaks, before, args.warmup)


def _result(stamps: list[tuple[float, float]], peaks: list[int], before: int, warmup: int) -> dict:
    timed = stamps[warmup - 1 :]  # from the end of the last warm-up step (warmup >= 1)
    n = len(timed) - 1
    return {
        "steps_per_s": n / (timed[-1][0] - timed[0][0]),
        # CPU seconds (all threads) per step: barely moved by other processes on the machine
        "cpu_s_per_step": (timed[-1][1] - timed[0][1]) / n,
        "steps_timed": n,
        "peak_rss_mib": peaks[-1] / 1024,
        "rss_before_mib": before / 1024,
        "peak_rise_mib": (peaks[-1] - before) / 1024,
    }


# --- the parent: alternate fresh subprocesses, take medians --------------------------------


def run_child(kind: str, args) -> dict:
    argv = [sys.executable, __file__, "--child", kind]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--batch-size", str(args.batch_size), "--micro", str(args.micro)]
    env = {**os.environ, "STROP_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trainers(args) -> dict:
    kinds = ["strop", "trl"]
    if args.trl_defaults:
        kinds.append("trl-defaults")
    if args.micro:
        kinds += ["strop-micro", "trl-micro"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(args.repeats):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:  # alternate: share the noise
            res = run_child(kind, args)
            runs[kind].append(res)
            print(
                f"  run {i + 1}/{args.repeats} {kind:13} {res['steps_per_s']:.3f} steps/s "
                f"({res['cpu_s_per_step']:.1f} CPU s/step), "
                f"peak {res['peak_rss_mib']:.0f} MiB (+{res['peak_rise_mib']:.0f})",
                flush=True,
            )
    return {
        k: {
            "runs": v,
            **{m: statistics.median(r[m] for r in v) for m in v[0] if m != "steps_timed"},
        }
        for k, v in runs.items()
    }


def serving(args) -> dict:
    """Promotion -> serving on a real `strop serve` process following the registry."""
    import httpx
    import redis
    import torch
    from peft import LoraConfig, get_peft_model

    from strop.adapters import AdapterStore
    from strop.model import load_model
    from strop.records import AdapterVersion, Keys
    from strop.registry import Registry

    port = 8700 + os.getpid() % 200
    prefix = f"bench-swap-{uuid.uuid4().hex[:8]}:"
    adapters = Path(tempfile.mkdtemp(prefix="strop-bench-")) / "adapters"
    env = {
        **os.environ,
        "STROP_PORT": str(port),
        "STROP_REDIS_PREFIX": prefix,
        "STROP_ADAPTER_DIR": str(adapters),
        "STROP_LOG_LEVEL": "WARNING",
    }
    env.pop("STROP_API_KEYS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port)], env=env, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    r = redis.Redis.from_url(os.environ.get("STROP_REDIS_URL", "redis://127.0.0.1:6379/0"))
    registry, store = Registry(r, Keys(prefix)), AdapterStore(adapters)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        model, _ = load_model("smollm2", Path.home() / ".cache" / "strop" / "models", "cpu")
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
        seen: list[tuple[float, float, str]] = []  # (sent, answered, model)
        stop = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    sent = time.perf_counter()
                    resp = c.post(
                        "/v1/chat/completions",
                        json={
                            "model": "strop",
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 1,
                        },
                    )
                    seen.append((sent, time.perf_counter(), resp.json().get("model", "error")))

        pollers = [threading.Thread(target=poll, daemon=True) for _ in range(2)]
        for t in pollers:
            t.start()
        rounds = []
        for n in range(1, args.swaps + 1):
            version = f"v{n}"
            meta = AdapterVersion(version=version, parent="base", path="", algorithm="bench")
            t0 = time.perf_counter()
            store.write(meta, lambda d: peft.save_pretrained(str(d)))
            written = time.perf_counter()
            registry.add(meta)
            registry.promote(version)
            promoted = time.perf_counter()
            name, served = f"strop@{version}", None
            while served is None and time.perf_counter() - promoted < 30:
                hits = [a for s, a, m in list(seen) if m == name and s >= promoted]
                served = min(hits) if hits else None
                time.sleep(0.005)
            rounds.append(
                {
                    "version": version,
                    "write_s": written - t0,
                    "promote_to_served_s": (served or float("nan")) - promoted,
                    "written_to_served_s": (served or float("nan")) - written,
                }
            )
            recent = [a - s for s, a, _ in seen if s >= promoted]
            rounds[-1]["request_s"] = statistics.median(recent) if recent else float("nan")
            print(
                f"  {version}: write {written - t0:.3f} s, served "
                f"{rounds[-1]['written_to_served_s']:.3f} s after it was written "
                f"(requests take {rounds[-1]['request_s']:.3f} s)",
                flush=True,
            )
            time.sleep(1.0)
        stop.set()
        errors = sum(1 for *_, m in seen if m == "error")
        return {
            "rounds": rounds,
            "requests": len(seen),
            "failed_requests": errors,
            **{
                k: statistics.median(x[k] for x in rounds)
                for k in ("write_s", "promote_to_served_s", "written_to_served_s")
            },
            "written_to_served_max_s": max(x["written_to_served_s"] for x in rounds),
            "request_s": statistics.median(x["request_s"] for x in rounds),
        }
    finally:
        proc.terminate()
        proc.wait(30)
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)


def table(results: dict, args) -> str:
    t = results.get("trainers", {})
    lines = [
        "| DPO on SmolLM2-135M, CPU | steps/s | CPU s/step | peak RSS (MiB) | rise (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "strop": "strop learner",
        "trl": "TRL DPOTrainer (same config)",
        "trl-defaults": "TRL DPOTrainer (its defaults: activation checkpointing)",
        "strop-micro": f"strop learner, micro-batches of {args.micro} pairs",
        "trl-micro": f"TRL DPOTrainer, {args.micro} pairs x gradient accumulation",
    }
    for k, v in t.items():
        lines.append(
            f"| {names[k]} | {v['steps_per_s']:.3f} | {v['cpu_s_per_step']:.1f} | "
            f"{v['peak_rss_mib']:.0f} | "
            f"{v['peak_rise_mib']:.0f} |"
        )
    if "serving" in results:
        s = results["serving"]
        lines += [
            "",
            "| promotion -> serving (`strop serve`, SmolLM2-135M) | median | max |",
            "|---|---:|---:|",
            f"| write a version (save, fsync, rename) | {s['write_s']:.3f} s | "
            f"{max(x['write_s'] for x in s['rounds']):.3f} s |",
            f"| promoted -> first response naming it | {s['promote_to_served_s']:.3f} s | "
            f"{max(x['promote_to_served_s'] for x in s['rounds']):.3f} s |",
            f"| written -> first response naming it | {s['written_to_served_s']:.3f} s | "
            f"{s['written_to_served_max_s']:.3f} s |",
            f"| (one request on its own, for scale) | {s['request_s']:.3f} s | |",
            "",
            f"{s['requests']} requests during the swaps, {s['failed_requests']} failed.",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--swaps", type=int, default=5, help="promotions timed")
    p.add_argument("--no-trl-defaults", dest="trl_defaults", action="store_false")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-trainers", action="store_true")
    p.add_argument(
        "--micro",
        type=int,
        default=2,
        help="also run both with micro-batches of this many pairs (0: don't)",
    )
    p.add_argument(
        "--child",
        choices=["strop", "trl", "trl-defaults", "strop-micro", "trl-micro"],
        help=argparse.SUPPRESS,
    )
    args = p.parse_args()
    if args.child:
        micro = args.micro if args.child.endswith("-micro") else None
        if args.child.startswith("strop"):
            res = child_strop(args, micro)
        else:
            res = child_trl(args, defaults=args.child == "trl-defaults", micro=micro)
        print(json.dumps(res))
        return

    import torch

    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "config": {
            "model": "SmolLM2-135M-Instruct",
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "micro_batch": args.micro,
            "lora": LORA,
            "learning_rate": LR,
            "beta": BETA,
            "pairs": make_pairs(2)[:1],
        },
    }
    print(f"DPO: {args.repeats} runs x {args.steps} timed steps of {args.batch_size} pairs")
    if not args.skip_trainers:
        results["trainers"] = trainers(args)
    if not args.skip_serving:
        print(f"promotion -> serving: {args.swaps} versions")
        results["serving"] = serving(args)
    out = ROOT / "bench" / "results" / "learner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(table(results, args))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
