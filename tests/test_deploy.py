"""The deployment files say what the code really does: every command in them parses with the real CLI,
the unit is hardened and parses, the compose pair points the GPU node at the memory host."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from expertflow.cli import build_parser, build_store_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _parse(argv: list[str], where: str):
    """Parse a full command line (program name first) with the parser of its program."""
    program = Path(argv[0]).name
    parser = {"expertflow-store": build_store_parser, "expertflow": build_parser}.get(program)
    assert parser is not None, f"{where}: unknown program {argv[0]!r}"
    try:
        return parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with the {program} CLI")


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: sections of keys, each with every value it was given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("["):
            assert line.endswith("]"), f"bad section header {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line outside a section or without '=': {line!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _env_example() -> dict[str, str]:
    env = {}
    for line in (DEPLOY / "store.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    return env


def test_systemd_unit_is_hardened_and_runs_a_real_serve_command() -> None:
    unit = _unit((DEPLOY / "expertflow-store.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit)
    service = unit["Service"]
    assert service["User"] == ["expertflow"] and service["Group"] == ["expertflow"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "RuntimeDirectory": "expertflow",
    }.items():
        assert service.get(key) == [value], key
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    env = _env_example()
    assert set(re.findall(r"\$\{(\w+)\}", service["ExecStart"][0])) <= set(env)
    command = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], service["ExecStart"][0])
    argv = shlex.split(command)
    args = _parse(argv, "expertflow-store.service")
    assert args.command == "serve"
    assert any(Path(args.path).is_relative_to(p) for p in service["ReadOnlyPaths"][0].split())
    ipc = [b for b in args.bind if b.startswith("ipc://")]
    assert all(b.startswith("ipc:///run/expertflow/") for b in ipc)  # inside RuntimeDirectory
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_accepts_the_unit() -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(DEPLOY / "expertflow-store.service")],
        capture_output=True,
        text=True,
    )
    # The user and binary do not exist on a build machine; syntax errors are what must not appear.
    assert "Unknown key" not in out.stderr and "Invalid" not in out.stderr, out.stderr


def test_compose_points_the_gpu_node_at_the_memory_host() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    host, node = services["memory-host"], services["gpu-node"]
    serve = _parse(["expertflow-store", *host["command"]], "compose memory-host")
    assert serve.command == "serve" and serve.preload
    [bind] = serve.bind
    port = bind.rsplit(":", 1)[1]
    generate = _parse([*node["entrypoint"], *node["command"]], "compose gpu-node")
    assert generate.command == "generate"
    assert generate.remote == [f"tcp://memory-host:{port}"]
    assert node["depends_on"]["memory-host"]["condition"] == "service_healthy"
    for svc in (host, node):
        assert all(v.endswith(":ro") for v in svc["volumes"]), "the checkpoint is mounted read-only"
    ping = host["healthcheck"]["test"]
    assert ping[0] == "CMD"
    assert _parse(ping[1:], "compose healthcheck").command == "ping"


def _json_array(line: str, instruction: str) -> list[str]:
    import json

    return json.loads(line[len(instruction) :].strip())


def test_containerfile_pins_torch_and_runs_the_daemon_unprivileged() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert "torch==2.13.0" in text
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    entrypoint = _json_array(next(line for line in lines if line.startswith("ENTRYPOINT")), "ENTRYPOINT")
    cmd = _json_array(next(line for line in lines if line.startswith("CMD")), "CMD")
    assert _parse([*entrypoint, *cmd], "Containerfile").command == "serve"
    health = next(line for line in lines if line.startswith("HEALTHCHECK"))
    health_cmd = _json_array(health[health.index("CMD") :], "CMD")
    assert _parse(health_cmd, "Containerfile HEALTHCHECK").command == "ping"


def _readme_commands(path: Path) -> list[list[str]]:
    """Every ``expertflow`` / ``expertflow-store`` command line in the bash blocks of a Markdown file."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("expertflow-store ", "expertflow ")) and "|" not in line:
                # Synopsis notation: optional parts in [brackets] are parsed as given, "..." is dropped.
                words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
                argv = [a for a in words if a != "..."]
                commands.append(argv)
    return commands


def test_every_command_in_the_deploy_readme_parses() -> None:
    commands = _readme_commands(DEPLOY / "README.md")
    assert len(commands) >= 6
    seen = {_parse(argv, "deploy/README.md").command for argv in commands}
    assert {"serve", "keygen", "stat", "ping", "generate"} <= seen


def test_every_command_in_the_main_readme_parses() -> None:
    commands = _readme_commands(DEPLOY.parent / "README.md")
    assert len(commands) >= 10
    seen = {_parse(argv, "README.md").command for argv in commands}
    assert {"serve", "stat", "ping", "generate", "bench", "pack", "inspect"} <= seen
