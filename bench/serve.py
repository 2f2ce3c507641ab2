"""Serving benchmark: strop's batching engine vs a plain one-at-a-time `model.generate` loop.

Side by side in one run, on the default model (SmolLM2-135M-Instruct) on this machine:
- throughput (completion tokens/s) and p50/p99 latency at 1, 4, 8 and 16 concurrent clients
  against a real `strop serve` process over HTTP;
- the same prompts served one request at a time by `model.generate` (the baseline);
- what logging adds to a request: the in-path cost of building and queueing a prompt-log
  record, and end-to-end latency with logging on vs off.
Each figure is the median of `--repeats` runs. Prints a table; writes bench/results/serve.json.

    python bench/serve.py [--repeats 3] [--max-tokens 64]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis briefly.",
    "What is 17 times 3?",
    "Give me three tips for better sleep.",
    "What is a prime number?",
    "Describe the color blue to someone who cannot see.",
    "Why is the sky blue?",
    "Name a famous painting and its painter.",
    "How do airplanes fly?",
    "Write one sentence about the sea.",
    "What does a compiler do?",
    "Summarise the plot of Hamlet.",
    "What is 12 + 30?",
    "Suggest a name for a cat.",
    "How many legs does a spider have?",
]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# --- strop over HTTP --------------------------------------------------------------------


def start_server(port: int, prefix: str, adapter_dir: str, threads: int = 0) -> subprocess.Popen:
    """`strop serve` on the default model, open on localhost, under its own Redis prefix;
    `threads` > 0 caps torch's intra-op threads (0: torch's default, one per core)."""
    env = {
        **os.environ,
        "STROP_PORT": str(port),
        "STROP_REDIS_PREFIX": prefix,
        "STROP_ADAPTER_DIR": adapter_dir,
        "STROP_LOG_LEVEL": "WARNING",
    }
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    for name in ("STROP_API_KEYS", "STROP_MODEL", "STROP_ENGINE"):  # the defaults, on purpose
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port)], env=env, cwd=ROOT
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("strop serve exited")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("strop serve did not become healthy")


def run_clients(
    url: str, concurrency: int, requests_per_client: int, max_tokens: int, log: bool = True
) -> dict:
    """`concurrency` threads, each sending its requests back to back."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    headers = {} if log else {"X-Strop-No-Log": "1"}

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(requests_per_client):
                prompt = PROMPTS[(k * requests_per_client + i) % len(PROMPTS)]
                body = {
                    "model": "strop",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                t = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=body, headers=headers)
                dt = time.perf_counter() - t
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens[0] / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "requests": len(latencies),
        "tokens": tokens[0],
    }


# --- the baseline -----------------------------------------------------------------------


def run_generate_loop(model, tok, n_requests: int, max_tokens: int) -> dict:
    import torch

    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(n_requests):
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        enc = tok.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        latencies.append(time.perf_counter() - t)
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "requests": n_requests,
        "tokens": tokens,
    }


# --- the cost of logging on the request path ---------------------------------------------


def logging_in_path_cost(n: int = 20000) -> dict:
    """Time to build a prompt-log record and hand it to the writer (what a request waits for)."""
    import asyncio

    from service.promptlog import PromptLog
    from strop.records import PromptLogRecord, SamplingRecord

    async def measure() -> list[float]:
        prefix = f"bench-{uuid.uuid4().hex[:6]}:"
        plog = PromptLog(
            "redis://127.0.0.1:6379/0", prefix + "log", prefix + "logged:", 1000, 100_000
        )
        times = []
        for i in range(n):
            t = time.perf_counter()
            plog.append(
                PromptLogRecord(
                    request_id=f"r{i}",
                    messages=[{"role": "user", "content": PROMPTS[i % 16]}],
                    sampling=SamplingRecord(max_tokens=64),
                    responses=["an answer " * 10],
                    model="strop",
                    version="base",
                    prompt_tokens=30,
                    completion_tokens=64,
                    latency_ms=800.0,
                    key_id="anonymous",
                )
            )
            times.append(time.perf_counter() - t)
        return times

    times = asyncio.run(measure())
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8,16")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict = {"max_tokens": args.max_tokens, "repeats": args.repeats, "strop": {}}

    # The baseline runs in this process while the server idles: each repeat measures the
    # generate loop and then strop at every concurrency, back to back, so the two see the
    # same machine (other load on these 2 cores shifts both alike).
    from strop.model import load_model
    from strop.settings import Settings

    s = Settings()
    model, tok = load_model(s.model, s.model_cache_dir, device="cpu")
    run_generate_loop(model, tok, 1, 8)  # warm-up

    port, prefix = 18765, f"bench-{uuid.uuid4().hex[:6]}:"
    loop_runs: list[dict] = []
    strop_runs: dict[int, list[dict]] = {c: [] for c in levels}
    with tempfile.TemporaryDirectory() as adapters:
        proc = start_server(port, prefix, adapters)
        url = f"http://127.0.0.1:{port}"
        try:
            run_clients(url, 2, 1, 8)  # warm-up
            for rep in range(args.repeats):
                loop_runs.append(run_generate_loop(model, tok, 8, args.max_tokens))
                print(
                    f"repeat {rep + 1}: generate loop {loop_runs[-1]['tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
                for c in levels:
                    strop_runs[c].append(run_clients(url, c, max(2, 16 // c), args.max_tokens))
                    print(
                        f"repeat {rep + 1}: strop c={c:<2} "
                        f"{strop_runs[c][-1]['tokens_per_s']:.1f} tok/s",
                        flush=True,
                    )
            on_off = {}
            for log in (True, False):
                runs = [run_clients(url, 1, 20, 1, log=log) for _ in range(args.repeats)]
                on_off["on" if log else "off"] = {
                    k: statistics.median(r[k] for r in runs) for k in ("p50_s", "p99_s")
                }
            results["logging_end_to_end"] = on_off
        finally:
            proc.terminate()
            proc.wait(30)
            import redis

            r = redis.Redis()
            keys = list(r.scan_iter(match=f"{prefix}*"))
            if keys:
                r.delete(*keys)

    def med(runs: list[dict]) -> dict:
        return {
            k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "p50_s", "p99_s")
        }

    results["generate_loop"] = med(loop_runs)
    results["strop"] = {c: med(runs) for c, runs in strop_runs.items()}
    results["ratios_per_repeat"] = {
        c: [sr["tokens_per_s"] / lr["tokens_per_s"] for sr, lr in zip(runs, loop_runs, strict=True)]
        for c, runs in strop_runs.items()
    }
    results["logging_in_path"] = logging_in_path_cost()

    base = results["generate_loop"]["tokens_per_s"]
    print(
        f"\nServing SmolLM2-135M-Instruct, {args.max_tokens} max tokens, greedy, "
        f"median of {args.repeats} runs (CPU, {os.cpu_count()} cores)\n"
    )
    print("| server | clients | tokens/s | x generate loop | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|---|")
    g = results["generate_loop"]
    print(
        f"| model.generate loop | 1 (serial) | {base:.1f} | 1.00 | {g['p50_s']:.2f} | {g['p99_s']:.2f} |"
    )
    for c, r in results["strop"].items():
        print(
            f"| strop (embedded) | {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} "
            f"| {r['p50_s']:.2f} | {r['p99_s']:.2f} |"
        )
    lp, e2e = results["logging_in_path"], results["logging_end_to_end"]
    print("\n| logging cost | p50 | p99 |\n|---|---|---|")
    print(
        f"| in the request path (build + enqueue record) | {lp['p50_ms']:.3f} ms | {lp['p99_ms']:.3f} ms |"
    )
    print(
        f"| end to end, 1-token requests, log on | {e2e['on']['p50_s'] * 1000:.1f} ms "
        f"| {e2e['on']['p99_s'] * 1000:.1f} ms |"
    )
    print(
        f"| end to end, 1-token requests, log off | {e2e['off']['p50_s'] * 1000:.1f} ms "
        f"| {e2e['off']['p99_s'] * 1000:.1f} ms |"
    )
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(
        "\nstrop / generate-loop throughput ratio per repeat: "
        + ", ".join(
            f"c={c}: " + "/".join(f"{x:.2f}" for x in xs)
            for c, xs in results["ratios_per_repeat"].items()
        )
    )
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
