"""The deployment files say what the code really does: every command in them parses with the real CLI,
the unit is hardened and parses, the image runs unprivileged, the compose pair points the GPU node at the
memory host. Static checks only: no network, no container runtime, no running systemd."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "expertflow-store.service"
ENV_EXAMPLE = DEPLOY / "store.env.example"
CONTAINERFILE = DEPLOY / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
DEPLOY_README = DEPLOY / "README.md"

ROOT_USERS = {"root", "0", "0:0"}


# --- helpers ---------------------------------------------------------------------------------------------


def _parse(argv: list[str], where: str):
    """Parse a full command line (program name first) with the real parser of its program."""
    from expertflow import cli

    program = PurePosixPath(argv[0]).name
    builders = {"expertflow-store": "build_store_parser", "expertflow": "build_parser"}
    assert program in builders, f"{where}: unknown program {argv[0]!r} in `{shlex.join(argv)}`"
    parser = getattr(cli, builders[program])()
    _no_abbreviations(parser)
    try:
        return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with the {program} CLI")


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Options must be spelled in full: a prefix that parses today breaks when the CLI grows an option."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: {section: {key: [every value given, in order]}}.

    Comments start with '#' or ';' (also between continuation lines), a trailing backslash continues a
    line (joined with a space), keys may repeat; an empty value (``Key=``) is kept as "".
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith(("#", ";")) or (pending is None and not line):
            continue
        if line.endswith("\\"):
            pending = (pending or "") + line[:-1].strip() + " "
            continue
        line, pending = ((pending or "") + line).strip(), None
        if line.startswith("["):
            assert line.endswith("]") and len(line) > 2, f"line {lineno}: bad section header {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {lineno}: {line!r} is outside any section"
        assert "=" in line, f"line {lineno}: {line!r} is not Key=Value"
        key, value = line.split("=", 1)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", key.strip()), f"line {lineno}: bad key {key!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert pending is None, "the file ends inside a continued line"
    return sections


def parse_env_file(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """An EnvironmentFile: (the assignments, the commented-out alternatives ``#KEY=value``)."""
    env: dict[str, str] = {}
    alternatives: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        commented = re.fullmatch(r"[#;]\s*([A-Z_][A-Z0-9_]*)=(.*)", line)
        if commented:
            alternatives.append((commented.group(1), commented.group(2).strip()))
        elif line and not line.startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Za-z_]\w*", key), f"bad line in an environment file: {line!r}"
            env[key] = value.strip()
    return env, alternatives


def systemd_argv(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: ``${VAR}`` becomes exactly one argument (or part of one), a word that
    is only ``$VAR`` is split at whitespace into zero or more arguments."""
    missing = set(re.findall(r"\$\{?(\w+)\}?", command)) - set(env)
    assert not missing, f"ExecStart uses {sorted(missing)}, which store.env.example does not set"
    argv: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env[whole.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return argv


def _seconds(value: str) -> float:
    """A systemd time span such as "30", "30s", "1min", "1min 30s"."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _is_under(path: str, parent: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(parent))


def _tcp_port(address: str) -> int:
    match = re.fullmatch(r"tcp://([^:/]+):(\d+)", address)
    assert match, f"not a tcp://HOST:PORT address: {address!r}"
    return int(match.group(2))


# --- systemd ---------------------------------------------------------------------------------------------


def test_unit_parser_handles_comments_continuations_and_repeated_keys() -> None:
    text = (
        "# top comment\n[Unit]\nDescription=x\n\n[Service]\n; other comment\n"
        "ExecStart=/bin/a one \\\n  # ignored between continuation lines\n  two \\\n  three\n"
        "ReadOnlyPaths=/a\nReadOnlyPaths=/b\nCapabilityBoundingSet=\n"
    )
    unit = parse_unit(text)
    assert unit["Unit"] == {"Description": ["x"]}
    assert unit["Service"]["ExecStart"] == ["/bin/a one two three"]
    assert unit["Service"]["ReadOnlyPaths"] == ["/a", "/b"]
    assert unit["Service"]["CapabilityBoundingSet"] == [""]
    with pytest.raises(AssertionError):
        parse_unit("Key=outside a section\n")
    with pytest.raises(AssertionError):
        parse_unit("[Service]\nno equals sign\n")


def _service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def _unit_commands() -> list[tuple[str, list[str]]]:
    """(label, argv) of ExecStart with store.env.example as shipped and with each commented alternative."""
    [exec_start] = _service()["ExecStart"]
    env, alternatives = parse_env_file(ENV_EXAMPLE.read_text())
    variants = [("store.env.example", env)]
    variants += [(f"store.env.example with {k}={v}", {**env, k: v}) for k, v in alternatives]
    return [(label, systemd_argv(exec_start, variant_env)) for label, variant_env in variants]


def test_unit_has_its_sections_and_an_unprivileged_user() -> None:
    unit = parse_unit(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(unit), f"sections: {sorted(unit)}"
    service = unit["Service"]
    assert service.get("DynamicUser") == ["no"]
    assert service.get("User") == ["expertflow"] and service.get("Group") == ["expertflow"]
    assert not ROOT_USERS & {*service["User"], *service["Group"]}
    assert service.get("EnvironmentFile") == ["/etc/expertflow/store.env"]
    assert unit["Install"].get("WantedBy") == ["multi-user.target"]


EXPECTED_SERVICE_SETTINGS = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "RuntimeDirectory": "expertflow",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
    "LimitMEMLOCK": "infinity",
}


@pytest.mark.parametrize(("key", "value"), EXPECTED_SERVICE_SETTINGS.items())
def test_unit_hardening_setting(key: str, value: str) -> None:
    assert _service().get(key) == [value], f"{UNIT.name}: expected {key}={value}"


def test_unit_limits_address_families_and_leaves_out_memory_deny_write_execute() -> None:
    service = _service()
    [families] = service["RestrictAddressFamilies"]
    assert set(families.split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    [nofile] = service["LimitNOFILE"]
    assert int(nofile) >= 4096
    # Left out on purpose (torch's run-time generated kernels need executable mappings), and said why.
    assert "MemoryDenyWriteExecute" not in service
    assert re.search(r"^#.*MemoryDenyWriteExecute", UNIT.read_text(), re.M), "say why it is left out"


def test_unit_exec_start_is_a_real_serve_command_inside_the_sandbox() -> None:
    service = _service()
    read_only = [p for entry in service["ReadOnlyPaths"] for p in entry.split()]
    [runtime_dir] = service["RuntimeDirectory"]
    [stop_timeout] = service["TimeoutStopSec"]
    commands = _unit_commands()
    assert len(commands) >= 2, "store.env.example should show at least one commented EXPERTFLOW_OPTS variant"
    for label, argv in commands:
        where = f"{UNIT.name} ExecStart ({label})"
        assert argv[0] == "/opt/expertflow/.venv/bin/expertflow-store", where
        args = _parse(argv, where)
        assert args.command == "serve", where
        assert any(_is_under(args.path, p) for p in read_only), f"{where}: {args.path} not under {read_only}"
        for bind in args.bind:
            if bind.startswith("ipc://"):  # the only writable place is the runtime directory
                assert _is_under(bind[len("ipc://") :], f"/run/{runtime_dir}"), f"{where}: {bind}"
            else:
                _tcp_port(bind)
        # Shutdown: up to --grace for in-flight replies, then up to --grace of socket linger.
        assert _seconds(stop_timeout) > 2 * args.grace, f"{where}: TimeoutStopSec too short for --grace"
        _accepted_by_the_daemon(args)
        for key_path in (args.curve_secret, args.allow_keys):
            if key_path:  # ProtectHome=yes hides these from the daemon
                assert not any(_is_under(key_path, p) for p in ("/home", "/root", "/run/user")), where
    # The CURVE variant is among the documented ones.
    assert any(_parse(argv, "unit").curve_secret for _, argv in commands)


def test_unit_and_readme_agree_on_the_venv() -> None:
    [exec_start] = _service()["ExecStart"]
    venv = str(PurePosixPath(shlex.split(exec_start)[0]).parents[1])
    assert f"python3 -m venv {venv}" in DEPLOY_README.read_text()


def _systemd_analyze_problems(unit: Path) -> list[str]:
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The user and the binary do not exist on a build machine; what must not appear are diagnostics of a
    # line of the file (unknown keys, values that do not parse).
    return [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if re.search(rf"{re.escape(unit.name)}:\d+:", line)
        or re.search(r"Unknown (key|section)|Failed to parse|Invalid", line)
    ]


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)


@needs_systemd_analyze
def test_systemd_analyze_accepts_the_unit() -> None:
    problems = _systemd_analyze_problems(UNIT)
    assert not problems, "\n".join(problems)


@needs_systemd_analyze
def test_systemd_analyze_check_catches_a_bad_unit(tmp_path: Path) -> None:
    bad = tmp_path / UNIT.name
    bad.write_text(UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=yess\nNoSuchKey=1"))
    assert len(_systemd_analyze_problems(bad)) >= 2


# --- Containerfile ---------------------------------------------------------------------------------------


def parse_containerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not pending and not line):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = (pending + line).strip(), ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def _exec_form(arguments: str, where: str) -> list[str]:
    try:
        argv = json.loads(arguments)
    except json.JSONDecodeError:
        pytest.fail(f"{where}: {arguments!r} is not in exec (JSON array) form")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), where
    return argv


def _containerfile() -> list[tuple[str, str]]:
    return parse_containerfile(CONTAINERFILE.read_text())


def _image_entrypoint() -> list[str]:
    [entrypoint] = [a for i, a in _containerfile() if i == "ENTRYPOINT"]
    return _exec_form(entrypoint, "Containerfile ENTRYPOINT")


def test_containerfile_installs_the_pinned_cpu_torch_first() -> None:
    instructions = _containerfile()
    assert instructions[0] == ("FROM", "python:3.12-slim")
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    runs = [
        re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), a)
        for i, a in instructions
        if i == "RUN"
    ]
    torch = [n for n, run in enumerate(runs) if "pip install" in run and "torch==2.13.0" in run]
    package = [n for n, run in enumerate(runs) if re.search(r"pip install (--\S+ )*/src\b", run)]
    assert torch and package, "expected `pip install torch==2.13.0 ...` and `pip install /src`"
    assert torch[0] < package[0], "torch must be installed before the package (or pip picks its own)"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch[0]]


def test_containerfile_copies_only_files_that_exist() -> None:
    copies = [a.split() for i, a in _containerfile() if i in {"COPY", "ADD"}]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), (
                f"Containerfile copies {source}, which is not in the build context"
            )
            assert source not in {".", "./"}, "copying the whole context drags .venv and .git into a layer"


def test_containerfile_runs_the_daemon_unprivileged() -> None:
    instructions = _containerfile()
    users = [(n, a.split()[0]) for n, (i, a) in enumerate(instructions) if i == "USER"]
    assert users, "no USER line: the container would run as root"
    last_index, last_user = users[-1]
    assert last_user not in ROOT_USERS
    entry_index = next(n for n, (i, _) in enumerate(instructions) if i == "ENTRYPOINT")
    assert last_index < entry_index


def test_containerfile_commands_parse_and_agree_on_the_port() -> None:
    instructions = _containerfile()
    [cmd] = [a for i, a in instructions if i == "CMD"]
    serve = _parse(
        [*_image_entrypoint(), *_exec_form(cmd, "Containerfile CMD")], "Containerfile ENTRYPOINT+CMD"
    )
    assert serve.command == "serve"
    [bind] = serve.bind
    port = _tcp_port(bind)
    assert bind.startswith("tcp://0.0.0.0:"), "bind all interfaces, or the port is unreachable from outside"
    _accepted_by_the_daemon(serve)
    exposed = [int(p.split("/")[0]) for i, a in instructions if i == "EXPOSE" for p in a.split()]
    assert port in exposed
    [health] = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert " CMD " in f" {health} ", "HEALTHCHECK needs a CMD"
    ping = _parse(
        _exec_form(health[health.index("CMD") + 3 :].strip(), "HEALTHCHECK"), "Containerfile HEALTHCHECK"
    )
    assert ping.command == "ping" and ping.address == f"tcp://127.0.0.1:{port}"


def _accepted_by_the_daemon(serve: argparse.Namespace) -> None:
    """The daemon would start with these options (an open bind needs CURVE or an explicit --insecure)."""
    from expertflow.services.server import ServerConfig

    ServerConfig(binds=tuple(serve.bind), curve_secret=serve.curve_secret, insecure=serve.insecure)


# --- compose ---------------------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _service_argv(service: dict) -> list[str]:
    """The full command a compose service runs: its entrypoint (or the image's) and its command."""
    entrypoint = service.get("entrypoint", _image_entrypoint())
    command = service.get("command", [])
    as_list = lambda v: shlex.split(v) if isinstance(v, str) else list(v)  # noqa: E731
    return [*as_list(entrypoint), *as_list(command)]


def _volumes(service: dict) -> dict[str, str]:
    """{container path: mode} of a service's short-syntax volumes ("SRC:DST[:MODE]", SRC may hold ${...:?msg})."""
    out = {}
    for volume in service.get("volumes", []):
        source_free = re.sub(r"\$\{[^}]*\}", "SRC", volume)
        parts = source_free.split(":")
        assert len(parts) in (2, 3), f"volume {volume!r}"
        out[parts[1]] = parts[2] if len(parts) == 3 else "rw"
    return out


def test_compose_services_run_real_commands() -> None:
    services = _compose()["services"]
    assert set(services) == {"memory-host", "gpu-node"}
    for name, service in services.items():
        assert service.get("image") == "expertflow", (
            f"{name} should run the image built from the Containerfile"
        )
        args = _parse(_service_argv(service), f"compose.yaml service {name}")
        mounts = _volumes(service)
        mount = next((m for m in mounts if _is_under(args.path, m)), None)
        assert mount is not None, f"{name}: {args.path} is not inside a volume"
        assert mounts[mount] == "ro", f"{name}: the checkpoint volume {mount} must be mounted read-only"


def test_compose_points_the_gpu_node_at_the_memory_host() -> None:
    services = _compose()["services"]
    host, node = services["memory-host"], services["gpu-node"]
    serve = _parse(_service_argv(host), "compose.yaml memory-host")
    assert serve.command == "serve" and serve.preload
    [bind] = serve.bind
    assert bind.startswith("tcp://0.0.0.0:"), "bind all interfaces, or other containers cannot connect"
    _accepted_by_the_daemon(serve)
    port = _tcp_port(bind)
    generate = _parse(_service_argv(node), "compose.yaml gpu-node")
    assert generate.command == "generate"
    assert generate.remote == [f"tcp://memory-host:{port}"]
    assert node["depends_on"]["memory-host"]["condition"] == "service_healthy"
    test = host["healthcheck"]["test"]
    assert test[0] == "CMD"
    ping = _parse(test[1:], "compose.yaml memory-host healthcheck")
    assert ping.command == "ping" and ping.address == f"tcp://127.0.0.1:{port}"


def test_compose_curve_variant_in_comments_parses() -> None:
    """The commented CURVE options, added to each service's command, still parse and use the keys volume."""
    text = COMPOSE.read_text()
    services = _compose()["services"]
    assert re.search(r"#\s*-\s*\./keys:/keys:ro", text), "the keys volume is shown"
    [server_extra] = re.findall(r'#\s*CURVE: replace "--insecure" with (.+)', text)
    [client_extra] = re.findall(r"#\s*CURVE: add (.+)", text)
    plain = [a for a in _service_argv(services["memory-host"]) if a != "--insecure"]
    server_argv = plain + json.loads(f"[{server_extra}]")
    client_argv = _service_argv(services["gpu-node"]) + shlex.split(client_extra)
    serve = _parse(server_argv, "compose.yaml memory-host with CURVE")
    generate = _parse(client_argv, "compose.yaml gpu-node with CURVE")
    assert (
        serve.curve_secret and serve.allow_keys and generate.curve_server_key and generate.curve_client_secret
    )
    assert not serve.insecure
    for path in (
        serve.curve_secret,
        serve.allow_keys,
        generate.curve_server_key,
        generate.curve_client_secret,
    ):
        assert _is_under(path, "/keys"), path


# --- README ----------------------------------------------------------------------------------------------


def readme_commands(markdown: str) -> list[list[str]]:
    """Every ``expertflow`` / ``expertflow-store`` command line in the bash blocks of a Markdown text.

    A leading ``sudo`` (``-u USER``) and a directory before the program name are allowed.
    """
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\s*sudo\s+(-u\s+\S+\s+)?", "", line).strip()
            if not re.match(r"(\S*/)?expertflow(-store)? ", line) or "|" in line:
                continue
            # Synopsis notation: optional parts in [brackets] are parsed as given, "..." is dropped.
            words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
            commands.append([a for a in words if a != "..."])
    return commands


def test_readme_extractor() -> None:
    assert readme_commands(
        "```bash\nsudo /opt/x/bin/expertflow-store keygen /k --name s   # c\n"
        "echo expertflow ping\nexpertflow generate D \\\n  --prompt 'a b'\n```\n"
    ) == [
        ["/opt/x/bin/expertflow-store", "keygen", "/k", "--name", "s"],
        ["expertflow", "generate", "D", "--prompt", "a b"],
    ]


def test_every_command_in_the_deploy_readme_parses() -> None:
    commands = readme_commands(DEPLOY_README.read_text())
    assert len(commands) >= 6
    seen = {_parse(argv, "deploy/README.md").command for argv in commands}
    assert {"serve", "keygen", "stat", "ping", "generate"} <= seen


def test_deploy_readme_names_files_that_exist() -> None:
    named = set(re.findall(r"\bdeploy/[\w.-]+", DEPLOY_README.read_text()))
    assert named
    for name in named:
        assert (REPO / name.rstrip(".")).exists(), f"deploy/README.md names {name}, which does not exist"


USER_DOCS = (
    "README.md",
    *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md"))),
    "benchmarks/README.md",
)


@pytest.mark.parametrize("doc", USER_DOCS)
def test_every_command_in_the_readme_and_the_docs_parses(doc: str) -> None:
    for argv in readme_commands((REPO / doc).read_text()):
        _parse(argv, doc)


def test_the_readme_and_the_docs_show_every_command() -> None:
    seen = {
        _parse(argv, doc).command for doc in USER_DOCS for argv in readme_commands((REPO / doc).read_text())
    }
    assert {
        "serve",
        "stat",
        "ping",
        "generate",
        "bench",
        "pack",
        "inspect",
        "eval",
        "checksums",
        "trace",
        "serve-model",
        "chat",
    } <= seen


def test_the_readme_is_a_guide_and_its_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for doc in USER_DOCS:
        base = (REPO / doc).parent
        for target in re.findall(r"\]\(([^)#\s]+)\)", (REPO / doc).read_text()):
            if not target.startswith(("http://", "https://")):
                assert (base / target).resolve().exists(), f"{doc} links to {target}, which does not exist"
