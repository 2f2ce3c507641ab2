"""Serving benchmark: strop's batching engine vs a plain `model.generate` loop, and vs vLLM.

Side by side in one run, on the default model (SmolLM2-135M-Instruct) on this machine:
- throughput (completion tokens/s) and p50/p99 latency at 1, 4, 8 and 16 concurrent clients
  against a real `strop serve` process over HTTP;
- the same prompts served one request at a time by `model.generate` (the baseline);
- what logging adds to a request: the in-path cost of building and queueing a prompt-log
  record, and end-to-end latency with logging on vs off.
Each figure is the median of `--repeats` runs. Prints a table; writes bench/results/serve.json.

With `--vllm`, three servers on the same closed-loop load instead (1, 8 and 16 clients by
default): vLLM direct (its CPU build, `ops.up.vllm_command`), `strop serve` in front of that
vLLM (STROP_ENGINE=remote), and `strop serve` with its embedded engine. Writes
bench/results/serve-vllm.json.

    python bench/serve.py [--repeats 3] [--max-tokens 64] [--concurrency 1,4,8,16]
    python bench/serve.py --vllm [--repeats 3] [--max-tokens 64] [--concurrency 1,8,16]
                          [--embedded-threads N]
"""

import argparse
import contextlib
import json
import os
import signal
import socket
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


def start_server(
    port: int, prefix: str, adapter_dir: str, threads: int = 0, env: dict | None = None
) -> subprocess.Popen:
    """`strop serve` on the default model, open on localhost, under its own Redis prefix;
    `threads` > 0 caps torch's intra-op threads (0: torch's default, one per core); `env`
    adds settings (e.g. the remote engine). In a process group of its own: see `stop`."""
    full = {
        **os.environ,
        "STROP_PORT": str(port),
        "STROP_REDIS_PREFIX": prefix,
        "STROP_ADAPTER_DIR": adapter_dir,
        "STROP_LOG_LEVEL": "WARNING",
    }
    if threads > 0:
        full["OMP_NUM_THREADS"] = full["MKL_NUM_THREADS"] = str(threads)
    for name in ("STROP_API_KEYS", "STROP_MODEL", "STROP_ENGINE"):  # the defaults, on purpose
        full.pop(name, None)
    full.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port)],
        env=full,
        cwd=ROOT,
        start_new_session=True,
    )
    wait_healthy(proc, f"http://127.0.0.1:{port}", "strop serve", 300)
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, name: str, timeout_s: float) -> None:
    """Return once GET `url`/health answers 200; stop `proc` and raise if it never does."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited (code {proc.returncode}) before serving")
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{name} did not become healthy within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `proc`'s process group, then SIGKILL to whatever of it outlives the grace
    or its leader (vLLM's engine core is a child process)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def hop_pairs(direct: tuple, front: tuple, n: int) -> dict:
    """`n` pairs of 1-token requests, direct then through strop: the p50s and the median of
    the pairs' differences (what strop adds)."""
    times: dict[str, list[float]] = {"vllm": [], "front": []}
    clients = {name: httpx.Client(timeout=600) for name in times}
    try:
        for i in range(n):
            for name, (url, model, headers) in (("vllm", direct), ("front", front)):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 1,
                    "temperature": 0,
                }
                t = time.perf_counter()
                r = clients[name].post(url + "/v1/chat/completions", json=body, headers=headers)
                times[name].append(time.perf_counter() - t)
                r.raise_for_status()
    finally:
        for c in clients.values():
            c.close()
    diffs = [f - d for d, f in zip(times["vllm"], times["front"], strict=True)]
    return {
        "vllm_p50_s": statistics.median(times["vllm"]),
        "front_p50_s": statistics.median(times["front"]),
        "added_ms": statistics.median(diffs) * 1000,
    }


def run_clients(
    url: str,
    concurrency: int,
    requests_per_client: int,
    max_tokens: int,
    log: bool = True,
    model: str = "strop",
    headers: dict | None = None,
) -> dict:
    """`concurrency` threads, each sending its requests back to back."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    headers = {**(headers or {}), **({} if log else {"X-Strop-No-Log": "1"})}

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(requests_per_client):
                prompt = PROMPTS[(k * requests_per_client + i) % len(PROMPTS)]
                body = {
                    "model": model,
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
        "wall_s": wall,
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


def bench_loop(args: argparse.Namespace, levels: list[int]) -> None:
    """strop's embedded engine vs the `model.generate` loop, and the cost of logging."""
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
            stop(proc)
            clean_redis(prefix)

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


def clean_redis(prefix: str) -> None:
    import redis

    r = redis.Redis()
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)


# --- vLLM direct, strop in front of vLLM, strop's embedded engine ------------------------

ARMS = ("vllm", "front", "embedded")
ARM_NAMES = {
    "vllm": "vLLM direct",
    "front": "strop -> vLLM",
    "embedded": "strop (embedded)",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of group `pgid`."""
    ticks = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            # after the ")" closing the command name: state, ppid, pgrp, ... utime, stime
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_vllm(port: int, log_path: Path) -> subprocess.Popen:
    """vLLM on the default model as `base`, started the way `strop up --engine vllm` does."""
    from ops.up import VLLM_READY_S, check_vllm, vllm_command
    from strop.model import default_model_dir
    from strop.settings import Settings

    s = Settings()
    check_vllm(s.vllm_python)
    argv, env = vllm_command(s, str(default_model_dir(s.model_cache_dir)), port)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", "vLLM", VLLM_READY_S)
    except RuntimeError:
        print(log_path.read_text()[-3000:], file=sys.stderr)
        raise
    return proc


def bench_vllm(args: argparse.Namespace, levels: list[int]) -> None:
    """vLLM direct vs strop in front of it vs strop's embedded engine, same load, same run."""
    from strop.settings import Settings

    # All three servers stay up for the whole run (vLLM takes minutes to start); each is
    # idle while another is measured, and the CPU the idle ones burn anyway is recorded.
    # Within a repeat the arms run back to back at each client count, in an order that
    # rotates from repeat to repeat, so pairs of arms see the same machine.
    key = Settings().engine_api_key  # vllm_command gives vLLM this key when it is set
    vllm_port, front_port, emb_port = free_port(), free_port(), free_port()
    log_path = Path(tempfile.gettempdir()) / f"strop-bench-vllm-{os.getpid()}.log"
    prefixes = [f"bench-{uuid.uuid4().hex[:6]}:" for _ in range(2)]
    procs: dict[str, subprocess.Popen] = {}
    runs: dict[str, dict[int, list[dict]]] = {a: {c: [] for c in levels} for a in ARMS}
    hop: list[dict] = []
    print(f"starting vLLM on port {vllm_port} (log: {log_path})", flush=True)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as adapters:
        try:
            procs["vllm"] = start_vllm(vllm_port, log_path)
            vllm_url = f"http://127.0.0.1:{vllm_port}"
            print(f"vLLM healthy after {time.time() - t_start:.0f} s", flush=True)
            remote = {"STROP_ENGINE": "remote", "STROP_ENGINE_URL": vllm_url}
            procs["front"] = start_server(front_port, prefixes[0], adapters, env=remote)
            procs["embedded"] = start_server(
                emb_port, prefixes[1], adapters, threads=args.embedded_threads
            )
            arms = {  # url, model name, headers
                "vllm": (vllm_url, "base", {"Authorization": f"Bearer {key}"} if key else {}),
                "front": (f"http://127.0.0.1:{front_port}", "strop", {}),
                "embedded": (f"http://127.0.0.1:{emb_port}", "strop", {}),
            }
            serving = {"vllm": ["vllm"], "front": ["front", "vllm"], "embedded": ["embedded"]}
            version = httpx.get(f"{vllm_url}/version", timeout=5).json().get("version")
            for url, model, headers in arms.values():  # warm-up, every batch size
                run_clients(url, max(levels), 1, 8, model=model, headers=headers)
            for rep in range(args.repeats):
                order = ARMS[rep % 3 :] + ARMS[: rep % 3]
                for c in levels:
                    for arm in order:
                        url, model, headers = arms[arm]
                        time.sleep(1)  # let the last arm's spinning OpenMP threads go to sleep
                        before = {n: group_cpu_s(p.pid) for n, p in procs.items()}
                        each = args.requests or max(2, 16 // c)
                        r = run_clients(url, c, each, args.max_tokens, model=model, headers=headers)
                        used = {n: group_cpu_s(p.pid) - before[n] for n, p in procs.items()}
                        # cores busy: the arm's own servers, and the idle others meanwhile
                        r["server_cores"] = sum(used[n] for n in serving[arm]) / r["wall_s"]
                        r["idle_others_cores"] = (
                            sum(v for n, v in used.items() if n not in serving[arm]) / r["wall_s"]
                        )
                        runs[arm][c].append(r)
                        print(
                            f"repeat {rep + 1}: {ARM_NAMES[arm]:<16} c={c:<2} "
                            f"{r['tokens_per_s']:6.1f} tok/s  p50 {r['p50_s'] * 1000:7.1f} ms  "
                            f"server {r['server_cores']:.2f} cores, "
                            f"others idle {r['idle_others_cores']:.2f}",
                            flush=True,
                        )
                # The hop alone: 1-token requests, where decode time is near nothing, in
                # pairs (direct, then through strop, same prompt) so that vLLM's own drift
                # cancels out of each pair's difference.
                h = hop_pairs(arms["vllm"], arms["front"], 40)
                hop.append(h)
                print(
                    f"repeat {rep + 1}: 1-token requests p50 {h['vllm_p50_s'] * 1000:.1f} ms "
                    f"direct, {h['front_p50_s'] * 1000:.1f} ms through strop, "
                    f"{h['added_ms']:.2f} ms added (median of pairs)",
                    flush=True,
                )
        finally:
            for proc in procs.values():
                stop(proc)
            for prefix in prefixes:
                clean_redis(prefix)

    keys = ("tokens_per_s", "p50_s", "p99_s", "server_cores", "idle_others_cores")
    results: dict = {
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests or "max(2, 16 // clients)",
        "repeats": args.repeats,
        "cores": os.cpu_count(),
        "embedded_threads": args.embedded_threads or None,  # None: torch's default
        "vllm_version": version,
        "minutes": (time.time() - t_start) / 60,
        "arms": {
            arm: {
                c: {
                    **{k: statistics.median(r[k] for r in rs) for k in keys},
                    "tokens_per_request": statistics.median(
                        r["tokens"] / r["requests"] for r in rs
                    ),
                }
                for c, rs in by_c.items()
            }
            for arm, by_c in runs.items()
        },
        "per_repeat": runs,
    }
    # Ratios are taken per repeat (the arms of one repeat ran back to back) and then the
    # median of those; so is the latency strop adds in front of vLLM.
    paired = {}
    for c in levels:
        # (direct, front, embedded) of each repeat
        reps = list(zip(*(runs[a][c] for a in ARMS), strict=True))
        paired[c] = {
            "front_over_direct": [f["tokens_per_s"] / d["tokens_per_s"] for d, f, _ in reps],
            "front_added_p50_ms": [(f["p50_s"] - d["p50_s"]) * 1000 for d, f, _ in reps],
            "embedded_over_direct": [e["tokens_per_s"] / d["tokens_per_s"] for d, _, e in reps],
        }
    paired["1-token"] = {"front_added_p50_ms": [h["added_ms"] for h in hop]}
    results["one_token"] = {
        arm: {"p50_s": statistics.median(h[f"{arm}_p50_s"] for h in hop)}
        for arm in ("vllm", "front")
    }
    results["one_token_per_repeat"] = hop
    results["paired_per_repeat"] = paired
    results["paired"] = {
        c: {k: statistics.median(v) for k, v in p.items()} for c, p in paired.items()
    }
    out = (args.out or ROOT / "bench" / "results" / "serve-vllm.json").resolve()
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))

    print(
        f"\nServing SmolLM2-135M-Instruct (fp32), vLLM {version} CPU build, "
        f"{args.max_tokens} max tokens, greedy, median of {args.repeats} runs "
        f"(CPU, {os.cpu_count()} cores"
        + (
            f", embedded strop on {args.embedded_threads} torch threads"
            * bool(args.embedded_threads)
        )
        + ")\n"
    )
    print(
        "| server | clients | tokens/s | x vLLM direct | p50 latency s | p99 latency s "
        "| tokens/request | server cores busy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        # x vLLM direct: the median of the per-repeat ratios, as in the table below
        ratio = {"vllm": 1.0, "front": results["paired"][c]["front_over_direct"]}
        ratio["embedded"] = results["paired"][c]["embedded_over_direct"]
        for arm in ARMS:
            r = results["arms"][arm][c]
            print(
                f"| {ARM_NAMES[arm]} | {c} | {r['tokens_per_s']:.1f} "
                f"| {ratio[arm]:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} "
                f"| {r['tokens_per_request']:.1f} | {r['server_cores']:.2f} |"
            )
    print(
        "\n| clients | strop -> vLLM / direct (target >= 0.95) | added p50 ms (target < 5) "
        "| embedded / vLLM direct |"
    )
    print("|---:|---:|---:|---:|")
    for c in levels:
        p, per = results["paired"][c], paired[c]
        print(
            f"| {c} | {p['front_over_direct']:.3f} "
            f"({'/'.join(f'{x:.2f}' for x in per['front_over_direct'])}) "
            f"| {p['front_added_p50_ms']:.1f} "
            f"({'/'.join(f'{x:.1f}' for x in per['front_added_p50_ms'])}) "
            f"| {p['embedded_over_direct']:.2f} "
            f"({'/'.join(f'{x:.2f}' for x in per['embedded_over_direct'])}) |"
        )
    one, added = results["one_token"], results["paired"]["1-token"]["front_added_p50_ms"]
    print(
        f"\n1-token requests, 1 client: p50 {one['vllm']['p50_s'] * 1000:.1f} ms direct, "
        f"{one['front']['p50_s'] * 1000:.1f} ms through strop: {added:.2f} ms added, "
        "median of direct/strop pairs "
        f"({'/'.join(f'{x:.1f}' for x in paired['1-token']['front_added_p50_ms'])})"
    )
    idle = max(r["idle_others_cores"] for by_c in runs.values() for rs in by_c.values() for r in rs)
    print(f"\nmost CPU the idle servers used during another arm's run: {idle:.3f} cores")
    print(f"{results['minutes']:.1f} min in all; wrote {out.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", help="client counts (default 1,4,8,16; 1,8,16 with --vllm)")
    ap.add_argument(
        "--vllm",
        action="store_true",
        help="vLLM direct vs strop in front of it vs strop's embedded engine",
    )
    ap.add_argument(
        "--embedded-threads",
        type=int,
        default=0,
        help="with --vllm: torch threads of the embedded strop (default: torch's, one per core)",
    )
    ap.add_argument(
        "--requests",
        type=int,
        default=0,
        help="with --vllm: requests each client sends (default max(2, 16 // clients)); more "
        "makes a run longer and its straggler at the end count for less",
    )
    ap.add_argument("--out", type=Path, help="with --vllm: the JSON file (serve-vllm.json)")
    args = ap.parse_args()
    levels = [
        int(c) for c in (args.concurrency or ("1,8,16" if args.vllm else "1,4,8,16")).split(",")
    ]
    (bench_vllm if args.vllm else bench_loop)(args, levels)


if __name__ == "__main__":
    main()
