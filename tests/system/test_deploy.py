"""The deployment files, checked as far as a machine without Docker or a running systemd allows.

- ``deploy/systemd/pacs-ai-node.service``: ``systemd-analyze verify`` and an
  offline ``systemd-analyze security`` score, plus the settings the README
  promises (user, state dir, hardening, stop timeout, reload).
- ``deploy/Dockerfile``: parsed by the small parser below (instructions,
  non-root user, pinned base images, ports, volume, CMD); its build stage is
  *replayed*: the files its COPY lines name go into a folder as in ``/src``,
  and its RUN line (``python -m venv ... && pip install .``) runs there,
  offline (``PIP_NO_INDEX``; the dependencies come from the test venv's
  site-packages through PYTHONPATH, the build backend too). The installed
  ``pacs-ai-node`` then runs ``--help``, ``config check`` and ``serve`` with
  the image's config, its container paths mapped into a temporary folder.
- ``deploy/compose.yaml``: parsed as YAML; every file it mounts exists, and
  the names that must agree (AE titles, host names, ports, mount points, the
  Lua script's modality alias) do. Then the pair it describes runs without
  Docker: Debian's Orthanc with ``deploy/docker/orthanc.json`` and the
  replayed node with ``deploy/docker/node.toml``, ports and host names mapped
  to loopback; each C-ECHOes the other with the demo's AE titles.

Not run here: ``docker build`` and ``docker compose up`` (no Docker engine),
and the unit under a real systemd (no systemd as PID 1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.data import REPO, abdomen_files
from support.dcmtk import storescu
from support.orthanc import DICOMWEB_PLUGIN, Orthanc, running_orthanc
from support.processes import free_port, port_open, stop_process, wait_for

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "pacs-ai-node.service"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
DOCKER_NODE_CONFIG = DEPLOY / "docker" / "node.toml"
DOCKER_ORTHANC_CONFIG = DEPLOY / "docker" / "orthanc.json"
ROUTE_LUA = DEPLOY / "orthanc" / "route-ct-to-ainode.lua"


# -- systemd ------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as section -> key -> values (keys may repeat; comments dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} is outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_with_stub_executable(tmp_path: Path) -> Path:
    """The unit with ExecStart's executable moved to a stub in tmp_path (verify checks that it exists)."""
    service = read_unit(UNIT)["Service"]
    executable = service["ExecStart"][0].split()[0]
    stub = tmp_path / executable.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(executable, str(stub)))
    return copy


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the unit cannot be verified here")
    return tool


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = unit_with_stub_executable(tmp_path)
    done = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # verify prints problems as warnings without failing: none allowed.
    assert done.stderr.strip() == "", done.stderr


def test_unit_hardening_scores_ok_offline(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = unit_with_stub_executable(tmp_path)
    help_text = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze has no --offline security review (systemd < 250)")
    done = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True,
                          text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    # 0 = fully locked down, 10 = not at all; "OK" is below 3 in systemd's own scale.
    assert float(match.group(1)) <= 2.0, done.stdout


def test_unit_runs_the_node_unprivileged_with_its_state_dir() -> None:
    unit = read_unit(UNIT)
    service = unit["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key} is not set"
        return service[key][-1]

    assert one("ExecStart").split()[1:] == ["serve", "--config", "/etc/pacs-ai-node/node.toml"]
    assert one("User") == one("Group") == "pacs-ai-node"
    assert one("StateDirectory") == "pacs-ai-node"
    assert one("ReadWritePaths") == "/var/lib/pacs-ai-node"
    assert one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") == ""
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"]
    assert one("UMask") == "0077"
    assert one("Restart") == "on-failure" and one("KillSignal") == "SIGTERM"
    # The node drains associations for 30 s (node.service.ASSOCIATION_DRAIN_SECONDS) before it exits.
    from node.service import ASSOCIATION_DRAIN_SECONDS

    assert int(one("TimeoutStopSec")) >= 2 * ASSOCIATION_DRAIN_SECONDS
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"  # `serve` reloads its config on SIGHUP
    assert "multi-user.target" in unit["Install"]["WantedBy"]


# -- Dockerfile ---------------------------------------------------------------

#: Every instruction Docker knows (https://docs.docker.com/reference/dockerfile/).
DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                       "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword, its flags (``--from=build``) and the rest of its text."""

    keyword: str
    flags: dict[str, str]
    text: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array form (``CMD ["a", "b"]``), or None for the shell form."""
        if not self.text.startswith("["):
            return None
        value = json.loads(self.text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def words(self) -> list[str]:
        return self.text.split()


@dataclass
class Stage:
    """A FROM and the instructions up to the next FROM."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage (the ``key=value`` form only)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', instruction.text):
                values[key] = value.strip('"')
        return values


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions: comment lines dropped, ``\\`` continuations joined."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buffer):
            continue  # comments (parser directives too) and blank lines inside a continuation
        if not stripped:
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        assert keyword in DOCKER_INSTRUCTIONS, f"line {number}: unknown instruction {keyword}"
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        instruction = Instruction(keyword, flags, rest, number)
        if keyword == "FROM":
            words = rest.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), f"line {number}: {line}"
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        else:
            assert stages, f"line {number}: {keyword} before the first FROM"
        stages[-1].instructions.append(instruction)
    return stages


def docker_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def docker_node_config() -> dict:
    return tomllib.loads(DOCKER_NODE_CONFIG.read_text())


def cmd_config_path(final: Stage) -> str:
    (cmd,) = final.all("CMD")
    words = cmd.exec_form()
    assert words is not None, "CMD must be in exec form (JSON), so that SIGTERM reaches the node, not a shell"
    assert words[:2] == ["pacs-ai-node", "serve"] and "--config" in words, words
    return words[words.index("--config") + 1]


def copied_to(stage: Stage, source: str) -> str:
    """The destination of the stage's COPY whose (only) source is ``source``."""
    for instruction in stage.all("COPY"):
        *sources, destination = instruction.words()
        if sources == [source]:
            return destination
    raise AssertionError(f"no COPY {source} in the stage FROM {stage.image}")


def test_dockerfile_parses_and_has_the_needed_instructions() -> None:
    stages = docker_stages()
    keywords = {i.keyword for stage in stages for i in stage.instructions}
    assert {"FROM", "RUN", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "VOLUME"} <= keywords
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image in names:
            continue  # FROM an earlier stage
        image = stage.image.split("@")[0]
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert (tag and tag != "latest") or "@sha256:" in stage.image, f"FROM {stage.image}: pin a tag (not latest)"
        assert repository


def test_dockerfile_runs_the_node_as_a_non_root_user() -> None:
    final = docker_stages()[-1]
    users = final.all("USER")
    assert users, "the final stage has no USER: the node would run as root"
    user = users[-1].text.split(":")[0]
    assert user not in ("root", "0"), user
    cmd_line = final.all("CMD")[-1].line
    assert users[-1].line < cmd_line
    created = " ".join(i.text for i in final.all("RUN"))
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", created), f"user {user} is not created in the image"


def test_dockerfile_agrees_with_the_image_config() -> None:
    final = docker_stages()[-1]
    config = docker_node_config()
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.words()}
    assert exposed == {config["node"]["port"], config["http"]["http_port"]}
    volumes = {v for i in final.all("VOLUME") for v in (i.exec_form() or i.words())}
    assert config["node"]["data_dir"] in volumes
    assert cmd_config_path(final) == copied_to(final, "deploy/docker/node.toml")
    assert config["models"]["models_dir"].rstrip("/") == copied_to(final, "onnx_models/").rstrip("/")
    for stage in docker_stages():
        for instruction in stage.all("COPY"):
            if "from" in instruction.flags:
                continue
            for source in instruction.words()[:-1]:
                assert (REPO / source).exists(), f"line {instruction.line}: COPY {source}: not in the repository"


def test_dockerfile_healthcheck_connects_to_the_dicom_port() -> None:
    final = docker_stages()[-1]
    (healthcheck,) = final.all("HEALTHCHECK")
    words = healthcheck.text.split(None, 1)
    assert words[0] == "CMD"
    command = json.loads(words[1])
    port = docker_node_config()["node"]["port"]
    assert command[0] == "python" and str(port) in command[-1]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        probe = [sys.executable, *command[1:-1], command[-1].replace(str(port), str(server.getsockname()[1]))]
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    closed = free_port()
    probe = [sys.executable, *command[1:-1], command[-1].replace(str(port), str(closed))]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0


# -- the Dockerfile's build, replayed ------------------------------------------


@dataclass
class Replayed:
    """The build stage's venv, made by its own RUN line, and the run stage's files in a fake root."""

    root: Path
    venv: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "pacs-ai-node"), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=self.root)

    def node_config(self, settings: dict[str, str | int] | None = None,
                    orthanc: tuple[str, int] | None = None) -> Path:
        """The image's node.toml with its absolute paths moved under ``root``; ``settings`` replaces
        ``key = value`` lines, ``orthanc`` the (host, port) of the destination "orthanc"."""
        text = (self.root / cmd_config_path(docker_stages()[-1]).lstrip("/")).read_text()
        text = re.sub(r'^(\s*(?:data_dir|models_dir|rules_file|tls_\w+_file)\s*=\s*")(/[^"]*)"',
                      lambda m: f'{m.group(1)}{self.root}{m.group(2)}"', text, flags=re.MULTILINE)
        for key, value in (settings or {}).items():
            text, count = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.MULTILINE)
            assert count == 1, key
        if orthanc is not None:
            text, count = re.subn(r'host = "orthanc", port = \d+', f'host = "{orthanc[0]}", port = {orthanc[1]}', text)
            assert count == 1, "the destination orthanc"
        path = self.root / "node-mapped.toml"
        path.write_text(text)
        return path


def copy_into(origin: Path, root: Path, destination: str) -> None:
    """``COPY origin destination`` with ``root`` as the image's / (or WORKDIR for a relative destination)."""
    target = root / destination.lstrip("/")
    if origin.is_dir():  # Docker copies the folder's content
        shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    else:
        if destination.endswith("/"):
            target = target / origin.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target)


def _dependencies_dir(folder: Path) -> Path:
    """The test venv's site-packages without the node itself (its editable install), as symlinks."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name in ("node", "pipelines") or entry.name.startswith(("pacs_ai_node", "__editable__")) \
                or entry.suffix == ".pth":
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Replayed:
    """Slow (about 5 s): the build stage's RUN line, offline, then the run stage's COPY lines into a fake root."""
    base = tmp_path_factory.mktemp("image")
    build, final = docker_stages()[0], docker_stages()[-1]
    (workdir,) = build.all("WORKDIR")
    src = base / workdir.text.lstrip("/")
    src.mkdir(parents=True)
    for instruction in build.all("COPY"):
        *sources, destination = instruction.words()
        for source in sources:
            copy_into(REPO / source, src, destination)
    venv_in_image = "/opt/pacs-ai-node/venv"
    venv = base / venv_in_image.lstrip("/")
    shims = base / "shims"
    shims.mkdir()
    (shims / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the image's `python`
    (shims / "python").chmod(0o755)
    env = {
        **os.environ, **build.env(),
        "PATH": f"{shims}:{os.environ['PATH']}",
        # Offline: no index; the dependencies (and setuptools, the build backend) are those of the test venv,
        # so the build runs without isolation (PIP_NO_BUILD_ISOLATION=0 means --no-build-isolation).
        "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_FIND_LINKS": "",
        "PYTHONPATH": str(_dependencies_dir(base / "dependencies")),
    }
    env.pop("VIRTUAL_ENV", None)
    for instruction in build.all("RUN"):
        command = instruction.text.replace(venv_in_image, str(venv))
        done = subprocess.run(["sh", "-c", command], cwd=src, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"RUN {instruction.text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # The run stage: COPY lines from the build context into the fake root.
    root = base / "root"
    for instruction in final.all("COPY"):
        if "from" not in instruction.flags:
            *sources, destination = instruction.words()
            for source in sources:
                copy_into(REPO / source, root, destination)
    run_env = {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    return Replayed(root=root, venv=venv, env=run_env)


def test_replayed_build_installs_a_wheel_not_the_checkout(replayed: Replayed) -> None:
    script = "import node, pipelines.rules.ruleset as r; print(node.__file__); print(r.DEFAULT_RULES_PATH)"
    probe = subprocess.run([str(replayed.venv / "bin" / "python"), "-c", script],
                           capture_output=True, text=True, env=replayed.env, cwd=replayed.root, timeout=60)
    assert probe.returncode == 0, probe.stderr
    module, rules = map(Path, probe.stdout.split())
    assert module.is_relative_to(replayed.venv), module  # not the repository's node/
    # package_data: what the node reads from its own package at run time.
    assert rules.is_file(), "default_rules.toml is missing from the installed package"
    assert (rules.parent.parent / "model" / "manifest.schema.json").is_file()
    templates = sorted(p.name for p in (REPO / "node" / "http").glob("templates/*.html"))
    assert sorted(p.name for p in (module.parent / "http").glob("templates/*.html")) == templates
    help_text = replayed.run("--help")
    assert help_text.returncode == 0 and "serve" in help_text.stdout, help_text.stderr


def test_replayed_install_finds_its_bundled_models_from_anywhere(replayed: Replayed, tmp_path: Path) -> None:
    """A plain install carries the bundles (setup.cfg data_files) and finds them without a config or a checkout."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env = {**replayed.env, "PACS_AI_NODE_CONFIG": str(empty)}  # the embedded defaults, whatever /etc holds
    env.pop("PACS_AI_NODE_MODELS", None)
    done = subprocess.run([str(replayed.venv / "bin" / "pacs-ai-node"), "models", "list"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    shared = replayed.venv / "share" / "pacs-ai-node" / "onnx_models"
    bundles = sorted(p.parent.name for p in (REPO / "onnx_models").glob("*/manifest.json"))
    assert f"{len(bundles)} bundles in {shared}, 0 broken" in done.stdout, done.stdout
    for name in bundles:
        assert re.search(rf"^{re.escape(name)}\s", done.stdout, re.MULTILINE), done.stdout
        assert not list((shared / name).glob("*.py")), "build/train scripts are not installed"
    version = subprocess.run([str(replayed.venv / "bin" / "pacs-ai-node"), "--version"], capture_output=True,
                             text=True, timeout=60, env=env, cwd=tmp_path)
    assert version.stdout.strip() == "pacs-ai-node 0.1.0"


def test_replayed_image_config_passes_config_check(replayed: Replayed) -> None:
    config = replayed.node_config()
    done = replayed.run("config", "check", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK:")
    assert "AE title AINODE" in done.stdout and "ORTHANC@orthanc:4242" in done.stdout
    for bundle in (replayed.root / "opt/pacs-ai-node/onnx_models").glob("*/manifest.json"):
        assert json.loads(bundle.read_text())["id"] in done.stdout


# -- compose ------------------------------------------------------------------


def compose_file() -> dict:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed (pip install pyyaml; the test extras bring it)")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def json_with_comments(text: str) -> dict:
    """Orthanc's configuration format: JSON with /* */ and // comments (outside strings)."""
    out, i, in_string = [], 0, False
    while i < len(text):
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\":
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) - 1 if "\n" in text[i:] else len(text)
        else:
            out.append(c)
        i += 1
    return json.loads("".join(out))


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (short syntax, relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_files_exist_and_names_agree() -> None:
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"orthanc", "node"}
    orthanc, node = services["orthanc"], services["node"]
    for name, service in services.items():
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source} is not declared"
    # The node: built from deploy/Dockerfile with the repository as context, its config mounted where CMD reads it.
    assert (DEPLOY / node["build"]["context"]).resolve() == REPO
    assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DOCKERFILE
    final = docker_stages()[-1]
    assert bind_mounts(node)[cmd_config_path(final)] == DOCKER_NODE_CONFIG
    node_config = docker_node_config()
    volume_targets = [v.split(":")[1] for v in node["volumes"]]
    assert node_config["node"]["data_dir"] in volume_targets
    published = {p.split(":")[-1].split("/")[0] for p in node["ports"]}
    assert {str(node_config["node"]["port"]), str(node_config["http"]["http_port"])} <= published
    grace = re.fullmatch(r"(\d+)s", str(node.get("stop_grace_period", "10s")))
    assert grace and int(grace.group(1)) >= 60, "the node drains for 30 s: stop_grace_period >= 60s"
    # Orthanc: its config and the routing rule mounted where Orthanc reads them.
    orthanc_mounts = bind_mounts(orthanc)
    assert orthanc_mounts["/etc/orthanc/orthanc.json"] == DOCKER_ORTHANC_CONFIG
    orthanc_config = json_with_comments(DOCKER_ORTHANC_CONFIG.read_text())
    for script in orthanc_config["LuaScripts"]:
        assert orthanc_mounts[script] == ROUTE_LUA
    assert str(orthanc.get("environment", {}).get("TCP_NODELAY")) == "1"
    assert "DicomWeb" in orthanc_config  # enables the plugin in the orthancteam image
    # The three names that must agree (README, "Connecting the node to a PACS").
    alias = re.search(r"^local NODE_MODALITY = '([^']+)'", ROUTE_LUA.read_text(), re.MULTILINE).group(1)
    aet, host, port = orthanc_config["DicomModalities"][alias]
    assert (aet, host, port) == (node_config["node"]["ae_title"], "node", node_config["node"]["port"])
    (destination,) = node_config["send"]["destinations"]
    assert (destination["ae_title"], destination["host"], destination["port"]) == (
        orthanc_config["DicomAet"], "orthanc", orthanc_config["DicomPort"])
    assert orthanc_config["DicomAet"] in node_config["node"]["allowed_calling_ae_titles"]
    assert f"{orthanc_config['DicomPort']}:{orthanc_config['DicomPort']}" in orthanc["ports"]


class ComposeOrthanc(Orthanc):
    """Debian's Orthanc with deploy/docker/orthanc.json; only what makes it private to the test changes."""

    def config(self) -> dict:
        config = json_with_comments(DOCKER_ORTHANC_CONFIG.read_text())
        mounts = bind_mounts(compose_file()["services"]["orthanc"])
        config["LuaScripts"] = [str(mounts[script]) for script in config["LuaScripts"]]
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]  # the orthancteam image enables it by itself
        for alias, (aet, _host, _port) in config["DicomModalities"].items():
            config["DicomModalities"][alias] = [aet, "127.0.0.1", self.node_port]
        config["StableAge"] = 2  # the demo waits 10 s
        return {**config, **self.private_config()}


@pytest.fixture
def compose_orthanc(tmp_path: Path) -> Iterator[ComposeOrthanc]:
    aet = json_with_comments(DOCKER_ORTHANC_CONFIG.read_text())["DicomAet"]
    yield from running_orthanc(ComposeOrthanc, tmp_path, aet)


def test_compose_pair_without_docker(replayed: Replayed, compose_orthanc: ComposeOrthanc, tmp_path: Path) -> None:
    """Slow (about 10 s): the demo's Orthanc and node configs on loopback: each C-ECHOes the other, and
    Orthanc's routing rule, loaded from where compose mounts it, forwards a CT series to the node."""
    orthanc = compose_orthanc
    # The node keeps what it receives (no processing: that is the loop tests' job).
    config = replayed.node_config({"port": orthanc.node_port, "http_port": free_port(),
                                   "complete_on_release": "false", "series_quiet_seconds": "600.0"},
                                  orthanc=("127.0.0.1", orthanc.dicom_port))
    log = tmp_path / "node.log"
    node = subprocess.Popen([str(replayed.venv / "bin" / "pacs-ai-node"), "serve", "--config", str(config)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=replayed.env, cwd=replayed.root)
    try:
        def ready() -> bool:
            if node.poll() is not None:
                raise RuntimeError(f"node exited with {node.returncode}: {log.read_text()[-3000:]}")
            return port_open(orthanc.node_port)

        wait_for(ready, 90, what="the node from the replayed image")
        # Orthanc -> node: the "ainode" modality, calling as ORTHANC (on the node's allow-list).
        orthanc.request("POST", "/modalities/ainode/echo", b"{}")
        # node -> Orthanc: the destination of the image's config.
        peers = replayed.run("peers", "test", "--config", str(config), "--timeout", "10")
        assert peers.returncode == 0, peers.stdout + peers.stderr
        assert "C-ECHO 0x0000" in peers.stdout
        # The routing rule: a CT series stored into Orthanc reaches the node, calling as ORTHANC.
        files = abdomen_files()[:8]
        sent = storescu(orthanc.dicom_port, files, called=orthanc.aet)
        assert sent.returncode == 0, sent.stderr
        pattern = (rf"association from {orthanc.aet} \(127.0.0.1\) released after [\d.]+ s: "
                   rf"{len(files)} instances stored")
        wait_for(lambda: re.search(pattern, log.read_text()), 60, what="the routed series at the node")
    finally:
        assert stop_process(node, signal.SIGTERM, timeout=60) == 0, log.read_text()[-3000:]
