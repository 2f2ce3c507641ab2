"""The `strop` command: one sub-command per part of the system."""

import argparse
import logging
import sys
import time

from strop.logs import setup_logging
from strop.settings import get_settings

log = logging.getLogger("strop.cli")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the chat service (uvicorn)."""
    import uvicorn

    from service.app import KEEP_ALIVE_S, create_app
    from strop.model import ModelNotFound, resolve_model_dir

    settings = get_settings()
    try:
        resolve_model_dir(settings.model, settings.model_cache_dir)
    except ModelNotFound as e:
        print(f"strop: {e}", file=sys.stderr)
        return 2
    host = args.host or settings.host
    port = args.port or settings.port
    if not settings.api_keys and host not in LOCAL_HOSTS:
        log.warning(
            "no API keys configured (STROP_API_KEYS): binding to 127.0.0.1 only, not %s", host
        )
        host = "127.0.0.1"
    elif not settings.api_keys:
        log.info("no API keys configured (STROP_API_KEYS): open API on localhost only")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return 0


def cmd_learner(args: argparse.Namespace) -> int:
    """Run the learner: train versions on groups or pairs, gate them, promote them."""
    from learner.loop import main as learner_main
    from strop.model import ModelNotFound

    try:
        return learner_main(get_settings(), max_versions=args.versions)
    except ModelNotFound as e:
        print(f"strop: {e}", file=sys.stderr)
        return 2


def cmd_adapters(args: argparse.Namespace) -> int:
    """List, show, promote or roll back adapter versions, or resume promotions after the
    collapse guard halted them (the registry in Redis)."""
    import json

    from strop.adapters import AdapterStore
    from strop.connection import connect
    from strop.records import AdapterVersion, Keys
    from strop.registry import Registry

    settings = get_settings()
    r = connect(settings.redis_url)
    registry, store = Registry(r, Keys(settings.redis_prefix)), AdapterStore(settings.adapter_dir)
    pointer = registry.promoted()
    if args.action == "list":
        print(
            f"{'':2}{'version':8} {'status':12} {'parent':7} {'algo':5} {'records':>7} "
            f"{'kl':>8} {'reward':>13}  created              reason"
        )
        for v in registry.all():
            g = v.gate
            reward = (
                f"{g['gate/reward_parent']:.2f}->{g['gate/reward_candidate']:.2f}"
                if "gate/reward_candidate" in g
                else "-"
            )
            kl = f"{g['gate/kl']:.3g}" if "gate/kl" in g else "-"
            records = sum(len(ids) for ids in v.consumed.values())
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created))
            mark = "* " if v.version == pointer else "  "
            print(
                f"{mark}{v.version:8} {v.status:12} {v.parent:7} {v.algorithm:5} {records:>7} "
                f"{kl:>8} {reward:>13}  {created}  {v.reason or ''}"
            )
        print(f"strop -> {pointer or 'base'}")
        if (halt := registry.halted()) is not None:
            print(
                f"promotion halted: {halt.reason} ({halt.version} rolled back to "
                f"{halt.rolled_back_to}); `strop adapters resume` allows promotions again"
            )
        return 0
    if args.action == "resume":
        halt = registry.resume(reason="manual (cli)")
        if halt is None:
            print("strop: promotion was not halted")
        else:
            print(f"strop: promotion resumed (halted since {halt.version}: {halt.reason})")
        return 0
    if args.action == "show":
        v = registry.get(args.version)
        if v is None and args.version in store.versions():
            v = store.read(args.version)  # on disk, not (yet) registered
        if v is None:
            print(f"strop: unknown version {args.version}", file=sys.stderr)
            return 1
        print(json.dumps(v.model_dump(), indent=2))
        return 0
    if args.action == "promote":
        if not store.has_adapter(args.version):
            print(f"strop: {args.version} is not in {store.root}", file=sys.stderr)
            return 1
        if registry.get(args.version) is None:  # on disk only: register it first
            registry.add(
                store.read(args.version)
                if args.version in store.versions()
                else AdapterVersion(
                    version=args.version,
                    parent="base",
                    path=str(store.path(args.version).resolve()),
                    reason="added by hand",
                )
            )
        previous = registry.promote(args.version, reason="manual (cli)")
        print(f"strop: {previous or 'base'} -> {args.version}")
        return 0
    try:  # rollback
        before, after = registry.rollback(to=args.version, reason="manual (cli)")
    except KeyError as e:
        print(f"strop: {e.args[0]}", file=sys.stderr)
        return 1
    print(f"strop: {before or 'base'} -> {after or 'base'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Start a Celery worker: ingest and build tasks, beat embedded unless --no-beat; or,
    with `requeue`, send the dead-lettered builds back to the build queue."""
    from worker.run import requeue, run_worker

    if args.action == "requeue":
        import redis

        settings = get_settings()
        try:
            n = requeue(settings)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            print(f"strop: Redis is unreachable at {settings.redis_url}: {e}", file=sys.stderr)
            return 1
        print(f"strop: {n} dead-lettered builds requeued" if n else "strop: no dead letters")
        return 0
    return run_worker(
        get_settings(), beat=not args.no_beat, concurrency=args.concurrency, pool=args.pool
    )


def cmd_beat(args: argparse.Namespace) -> int:
    """Start Celery beat alone (for workers started with --no-beat)."""
    from worker.run import run_beat

    return run_beat(get_settings())


def cmd_status(args: argparse.Namespace) -> int:
    """Versions, reward trends, traffic, queues and learner state at a glance (from Redis)."""
    from ops.status import run

    return run(get_settings(), args.window * 60, args.watch, args.json)


def cmd_up(args: argparse.Namespace) -> int:
    """The whole loop on one machine: Redis (found or started), service, worker, learner."""
    from ops.up import UpError, run
    from strop.model import ModelNotFound

    try:
        return run(get_settings(), engine=args.engine)
    except (UpError, ModelNotFound) as e:
        print(f"strop: {e}", file=sys.stderr)
        return 2


def cmd_demo(args: argparse.Namespace) -> int:
    """Drive a running stack with traffic until versions are promoted; print the results."""
    from ops.demo import run_demo

    return run_demo(
        get_settings(),
        versions=args.versions,
        minutes=args.minutes,
        held_out=args.held_out,
        feedback=args.feedback,
    )


def _share(text: str) -> float:
    x = float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, not {text}")
    return x


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="start the OpenAI-compatible chat service")
    p.add_argument("--host", default=None, help="bind address (default STROP_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default STROP_PORT)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("up", help="run the whole loop on this machine (no Docker)")
    p.add_argument(
        "--engine",
        choices=["embedded", "vllm"],
        default="embedded",
        help="vllm: start vLLM (STROP_VLLM_PYTHON; `bash scripts/vllm-venv`) and serve through it",
    )
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("demo", help="send traffic to a running stack and report what it learned")
    p.add_argument("--versions", type=int, default=2, help="stop after this many promotions")
    p.add_argument("--minutes", type=float, default=30, help="give up after this long")
    p.add_argument(
        "--held-out", type=int, default=40, help="labeled questions for the accuracy check"
    )
    p.add_argument(
        "--feedback",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="send the true answer as user feedback on this share (0..1) of the questions",
    )
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("learner", help="train, gate and promote adapter versions")
    p.add_argument(
        "--versions", type=int, default=None, help="exit after writing this many versions"
    )
    p.set_defaults(func=cmd_learner)
    p = sub.add_parser("adapters", help="adapter versions: list, show, promote, rollback, resume")
    act = p.add_subparsers(dest="action", required=True)
    act.add_parser("list", help="every version with its status; * marks `strop`")
    act.add_parser("show", help="one version's metadata").add_argument("version")
    act.add_parser("promote", help="point `strop` at a version").add_argument("version")
    act.add_parser(
        "rollback", help="point `strop` back (default: the previous promoted version)"
    ).add_argument("version", nargs="?", default=None, help="vN, or `base`")
    act.add_parser("resume", help="allow promotions again after the collapse guard halted them")
    p.set_defaults(func=cmd_adapters)
    p = sub.add_parser("worker", help="build scored groups and pairs from the prompt log")
    p.add_argument(
        "action",
        nargs="?",
        choices=["requeue"],
        help="requeue: build the dead-lettered prompts again (after fixing their cause)",
    )
    p.add_argument("--no-beat", action="store_true", help="don't embed beat (run `strop beat`)")
    p.add_argument("--concurrency", type=int, default=None, help="task processes (default: CPUs)")
    p.add_argument("--pool", default="prefork", help="Celery pool (default prefork)")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("beat", help="schedule ingest for workers started with --no-beat")
    p.set_defaults(func=cmd_beat)
    p = sub.add_parser("status", help="versions, reward trends, queues and learner at a glance")
    p.add_argument("--window", type=float, default=60, help="minutes of history (default 60)")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=5.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 5) until Ctrl-C",
    )
    p.add_argument("--json", action="store_true", help="print the gathered data as JSON")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    setup_logging(settings.log_level)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
