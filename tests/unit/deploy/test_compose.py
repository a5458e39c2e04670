"""deploy/compose and deploy/docker, checked without a container engine.

gen-secrets.sh runs for real (into tmp_path, with names other than the templates'); each
container's /run/secrets is emulated from the service's `secrets:` list, so a config that
names a secret its service does not mount fails. Enclave's config is loaded by Enclave's
loader, Synapse's by Synapse's (its gate module imported from bridge/gate/module.py as
compose mounts it), the registration by Synapse's appservice loader and compared with what
`enclave registration` would write.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import build_parser, registration_dict
from bridge.config import check_secrets, load_config

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
GEN_SECRETS = COMPOSE_DIR / "gen-secrets.sh"
CADDYFILE = COMPOSE_DIR / "caddy" / "Caddyfile"

# names unlike the templates' (example.com), one containing the server name, to catch a
# renderer that replaces twice
NAMES = {"SERVER_NAME": "corp-x.test", "MATRIX_HOST": "matrix.corp-x.test",
         "ELEMENT_HOST": "chat.corp-x.test"}


# -- helpers ---------------------------------------------------------------------------------
def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?err} and ${VAR:-default} from env."""
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op == ":-":
            return arg or ""
        raise AssertionError(f"{name} is used in compose.yaml but not set in .env.example")
    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", sub, value)


def secret_entries(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target file name) of a service's secrets, short or long syntax."""
    out = []
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            out.append((entry, entry))
        else:
            target = entry.get("target", entry["source"])
            assert "/" not in target, f"{target}: keep secrets under /run/secrets"
            out.append((entry["source"], target))
    return out


def run_secrets(service: str, secrets_dir: Path, dest: Path) -> Path:
    """The /run/secrets compose would give ``service``: its own secrets only."""
    doc = compose()
    dest.mkdir(parents=True, exist_ok=True)
    for source, target in secret_entries(doc["services"][service]):
        file = doc["secrets"][source]["file"]
        assert file.startswith("./secrets/"), file
        shutil.copy(secrets_dir / file.removeprefix("./secrets/"), dest / target)
    return dest


def rewrite_secret_files(node: Any, run_secrets_dir: Path) -> Any:
    """Every {file: /run/secrets/X} of a config tree pointed at run_secrets_dir/X."""
    if isinstance(node, dict):
        if set(node) == {"file"} and str(node["file"]).startswith("/run/secrets/"):
            return {"file": str(run_secrets_dir / node["file"].removeprefix("/run/secrets/"))}
        return {k: rewrite_secret_files(v, run_secrets_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite_secret_files(v, run_secrets_dir) for v in node]
    return node


def port_of(url: str) -> int:
    m = re.fullmatch(r"https?://[^/:]+:(\d+)/?", url)
    assert m, f"{url}: expected an explicit port"
    return int(m.group(1))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exposed_port() -> int:
    exposes = [a for i, a in dockerfile_instructions() if i == "EXPOSE"]
    assert len(exposes) == 1, exposes
    return int(exposes[0].split("/")[0])


def load_enclave(config_path: Path, secrets_dir: Path, service: str,
                 tmp_path: Path) -> Any:
    """Enclave's config as ``service`` would load it (its mounted secrets only)."""
    mounted = run_secrets(service, secrets_dir, tmp_path / f"run-secrets-{service}")
    data = rewrite_secret_files(yaml.safe_load(config_path.read_text()), mounted)
    path = tmp_path / f"{service}-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = load_config(path)
    return loaded, check_secrets(loaded)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env(COMPOSE_DIR / ".env.example")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory,
              env_example: dict[str, str]) -> dict[str, Path]:
    """gen-secrets.sh run for real on a .env with NAMES."""
    base = tmp_path_factory.mktemp("compose")
    text = (COMPOSE_DIR / ".env.example").read_text()
    for key, value in NAMES.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert n == 1, key
    (base / ".env").write_text(text)
    result = subprocess.run(
        ["bash", str(GEN_SECRETS), "--env", str(base / ".env"), "--secrets",
         str(base / "secrets"), "--out", str(base / "generated")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return {"base": base, "secrets": base / "secrets", "out": base / "generated"}


# -- images, variables ------------------------------------------------------------------------
def test_every_image_is_pinned(env_example: dict[str, str]) -> None:
    doc = compose()
    images = {name: interpolate(svc["image"], env_example)
              for name, svc in doc["services"].items()}
    froms = [a.split()[0] for i, a in dockerfile_instructions() if i == "FROM"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    images.update({f"Dockerfile FROM {f}": interpolate(f, args) for f in froms
                   if f != "builder"})
    for where, image in images.items():
        name, sep, tag = image.rpartition(":")
        assert sep and name and "/" not in tag, f"{where}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{where}: {image} is not pinned"
    # Enclave's services are built from the Dockerfile
    for name in ("enclave", "enclave-migrate"):
        assert doc["services"][name]["build"] == {"context": "../..",
                                                  "dockerfile": "deploy/docker/Dockerfile"}
        assert (COMPOSE_DIR / "../.." / "deploy/docker/Dockerfile").resolve() == DOCKERFILE


def test_synapse_image_is_the_version_the_gate_is_tested_with(
    env_example: dict[str, str],
) -> None:
    synapse = pytest.importorskip("synapse")
    tag = env_example["SYNAPSE_IMAGE"].rpartition(":")[2]
    tested = re.match(r"\d+\.\d+", synapse.__version__).group(0)
    assert tag.lstrip("v").startswith(tested + "."), (
        f"compose pins Synapse {tag} but the tests (and the gate module) run on "
        f"{synapse.__version__}: move both together")


def test_every_variable_is_in_env_example(env_example: dict[str, str]) -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    assert used - set(env_example) == set()
    for key in ("SERVER_NAME", "MATRIX_HOST", "ELEMENT_HOST", "ACME_EMAIL"):
        assert env_example.get(key), key


# -- secrets ----------------------------------------------------------------------------------
def test_secrets_are_declared_generated_and_ignored(generated: dict[str, Path]) -> None:
    doc = compose()
    top = doc["secrets"]
    used = set()
    for name, svc in doc["services"].items():
        for source, _ in secret_entries(svc):
            assert source in top, f"service {name} uses undeclared secret {source}"
            used.add(source)
        # nothing secret in the environment: only *_FILE names pointing at a mounted secret
        targets = {t for _, t in secret_entries(svc)}
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
                assert key.endswith("_FILE"), f"{name}: {key} carries a secret inline"
                assert value.removeprefix("/run/secrets/") in targets, (name, key, value)
    assert used == set(top), f"declared but unused: {set(top) - used}"
    files = []
    for name, spec in top.items():
        assert set(spec) == {"file"}, f"secret {name}: only file secrets, got {spec}"
        assert spec["file"].startswith("./secrets/"), spec
        files.append(spec["file"].removeprefix("./secrets/"))
        path = generated["secrets"] / files[-1]
        assert path.is_file() and path.read_text().strip(), f"gen-secrets.sh did not write {path}"
        # readable by the containers' own users (bind mounts keep host modes)
        assert path.stat().st_mode & 0o777 == 0o444, oct(path.stat().st_mode)
    assert generated["secrets"].stat().st_mode & 0o777 == 0o700

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("git not available to check the ignore rules")
    paths = [f"deploy/compose/secrets/{f}" for f in files] + [
        "deploy/compose/.env", "deploy/compose/generated/enclave/config.yaml"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert sorted(result.stdout.split()) == sorted(paths), result.stdout
    kept = subprocess.run(["git", "check-ignore", "--no-index",
                           "deploy/compose/secrets/README.md", "deploy/compose/.env.example"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert kept.stdout == "", f"must stay tracked: {kept.stdout}"


def test_gen_secrets_keeps_values_and_rewrites_derived_files(tmp_path: Path,
                                                             generated) -> None:
    work = tmp_path / "again"
    shutil.copytree(generated["base"], work)
    before = {p.name: p.read_text() for p in (work / "secrets").iterdir()}
    env = (work / ".env").read_text().replace("SERVER_NAME=corp-x.test",
                                              "SERVER_NAME=other.test")
    (work / ".env").write_text(env)
    result = subprocess.run(["bash", str(GEN_SECRETS), "--env", str(work / ".env"),
                             "--secrets", str(work / "secrets"), "--out",
                             str(work / "generated")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    after = {p.name: p.read_text() for p in (work / "secrets").iterdir()}
    derived = {"synapse_database.yaml", "enclave_registration.yaml"}
    for name in set(before) - derived:
        assert after[name] == before[name], f"{name} was regenerated"
    assert "other\\.test" in after["enclave_registration.yaml"]
    cfg = yaml.safe_load((work / "generated/enclave/config.yaml").read_text())
    assert cfg["homeserver"]["server_name"] == "other.test"
    # a bad name is refused before anything is written
    (work / ".env").write_text(env.replace("SERVER_NAME=other.test",
                                           "SERVER_NAME=bad/name"))
    bad = subprocess.run(["bash", str(GEN_SECRETS), "--env", str(work / ".env"),
                          "--secrets", str(work / "secrets"), "--out", str(work / "g2")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "not a DNS name" in bad.stderr
    assert not (work / "g2").exists()


# -- Enclave ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["template", "generated"])
@pytest.mark.parametrize("service", ["enclave", "enclave-migrate"])
def test_enclave_config_validates_with_the_services_secrets(
    tmp_path: Path, generated, which: str, service: str,
) -> None:
    path = (COMPOSE_DIR / "enclave" / "config.yaml" if which == "template"
            else generated["out"] / "enclave" / "config.yaml")
    loaded, secrets = load_enclave(path, generated["secrets"], service, tmp_path)
    cfg = loaded.config
    assert cfg.database.url.startswith("postgresql://") and "database.password" in secrets
    assert cfg.gate is not None and "gate.secret" in secrets
    assert cfg.appservice.bind_host == "0.0.0.0"
    expected = "example.com" if which == "template" else NAMES["SERVER_NAME"]
    assert cfg.homeserver.server_name == expected
    # the database is the compose PostgreSQL's `enclave` database
    assert re.fullmatch(r"postgresql://enclave@postgres:5432/enclave", cfg.database.url)


def test_enclave_services_commands_and_mounts() -> None:
    doc = compose()
    parser = build_parser()
    migrate, run = doc["services"]["enclave-migrate"], doc["services"]["enclave"]
    m_args, r_args = parser.parse_args(migrate["command"]), parser.parse_args(run["command"])
    assert m_args.cmd == "migrate" and r_args.cmd == "run" and r_args.no_migrate
    assert m_args.config == r_args.config == "/etc/enclave/config.yaml"
    assert run["depends_on"]["enclave-migrate"] == {
        "condition": "service_completed_successfully"}
    assert migrate["restart"] == "no" and run["restart"] == "unless-stopped"
    for svc in (migrate, run):
        assert "./generated/enclave/config.yaml:/etc/enclave/config.yaml:ro" in svc["volumes"]
        assert any(v.endswith(":/var/lib/enclave") for v in svc["volumes"])
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]


def test_ports_agree(generated, tmp_path: Path) -> None:
    """appservice.port = Dockerfile EXPOSE = HEALTHCHECK = compose ports = registration url
    = the gate module's url."""
    doc = compose()
    cfg = yaml.safe_load((generated["out"] / "enclave/config.yaml").read_text())
    port = cfg["appservice"]["port"]
    assert exposed_port() == port
    health = next(a for i, a in dockerfile_instructions() if i == "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/health" in health
    run = doc["services"]["enclave"]
    assert [str(port)] == run["expose"]
    assert [p.rsplit(":", 1)[1] for p in run["ports"]] == [str(port)]
    assert all(p.startswith("127.0.0.1:") for p in run["ports"]), "publish on loopback only"
    assert port_of(cfg["appservice"]["public_url"]) == port
    assert cfg["appservice"]["public_url"] == f"http://enclave:{port}"
    reg = yaml.safe_load((generated["secrets"] / "enclave_registration.yaml").read_text())
    assert reg["url"] == cfg["appservice"]["public_url"]
    hs = yaml.safe_load((generated["out"] / "synapse/homeserver.yaml").read_text())
    gate = next(m for m in hs["modules"] if m["module"] == "enclave_gate.EnclaveGate")
    assert gate["config"]["url"] == f"http://enclave:{port}"
    # Enclave calls Synapse on the compose network at its listener
    listener = hs["listeners"][0]
    assert cfg["homeserver"]["url"] == f"http://synapse:{listener['port']}"


def test_registration_is_what_enclave_would_write(generated, tmp_path: Path) -> None:
    loaded, secrets = load_enclave(generated["out"] / "enclave/config.yaml",
                                   generated["secrets"], "enclave", tmp_path)
    expected = registration_dict(loaded, secrets["appservice.as_token"].get(),
                                 secrets["appservice.hs_token"].get())
    actual = yaml.safe_load((generated["secrets"] / "enclave_registration.yaml").read_text())
    assert actual == expected


# -- Synapse ----------------------------------------------------------------------------------
def test_synapse_config_loads_in_synapse(generated, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """homeserver.yaml + the database secret, as Synapse's own config loader reads them
    (with --no-secrets-in-config), the gate module imported the way compose mounts it, and
    the registration through Synapse's appservice loader."""
    pytest.importorskip("synapse.config.homeserver")
    from synapse.config.appservice import load_appservices
    from synapse.config.homeserver import HomeServerConfig

    doc = compose()
    svc = doc["services"]["synapse"]
    root = tmp_path / "synapse-root"
    mounted = run_secrets("synapse", generated["secrets"], root / "run/secrets")
    shutil.copytree(generated["out"] / "synapse", root / "config")
    (root / "data").mkdir()
    # volumes as compose mounts them (the gate module from this checkout)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts["/config"] == "./generated/synapse"
    module_src = (COMPOSE_DIR / mounts["/modules/enclave_gate.py"]).resolve()
    assert module_src == ROOT / "bridge" / "gate" / "module.py"
    assert svc["environment"]["PYTHONPATH"] == "/modules"
    (root / "modules").mkdir()
    shutil.copy(module_src, root / "modules" / "enclave_gate.py")
    monkeypatch.syspath_prepend(str(root / "modules"))
    monkeypatch.delitem(sys.modules, "enclave_gate", raising=False)

    def here(path: str) -> str:
        for prefix in ("/run/secrets/", "/config/", "/data/", "/modules/"):
            path = path.replace(prefix, f"{root}{prefix}")
        return path

    hs_text = here((root / "config/homeserver.yaml").read_text())
    (root / "config/homeserver.yaml").write_text(hs_text)
    # the image's start.py passes everything after `run` to synapse.app.homeserver
    assert svc["command"][0] == "run"
    args = [here(a) for a in svc["command"][1:]]
    assert "--no-secrets-in-config" in args
    config = HomeServerConfig.load_config("compose synapse", args)
    monkeypatch.delitem(sys.modules, "enclave_gate", raising=False)

    assert config.server.server_name == NAMES["SERVER_NAME"]
    assert config.server.public_baseurl == f"https://{NAMES['MATRIX_HOST']}/"
    db = config.database.databases[0].config
    assert db["name"] == "psycopg2"
    assert db["args"]["host"] == "postgres" and db["args"]["dbname"] == "synapse"
    # the password PostgreSQL's init script gave the synapse role
    assert db["args"]["password"] == (
        generated["secrets"] / "synapse_db_password").read_text().strip()
    (module, module_config), = config.modules.loaded_modules
    assert module.__name__ == "EnclaveGate"
    # the module read its secret at parse time: the gate secret is mounted
    assert (mounted / "gate_secret").exists()
    assert sorted(module_config.enclave_users) == sorted(
        [f"@enclave:{NAMES['SERVER_NAME']}", f"@enclave-admin:{NAMES['SERVER_NAME']}"])
    services = load_appservices(config.server.server_name,
                                config.appservice.app_service_config_files)
    assert [(s.id, s.url, s.sender.to_string()) for s in services] == [
        ("enclave", "http://enclave:29330", f"@enclave:{NAMES['SERVER_NAME']}")]
    assert services[0].is_interested_in_user(f"@alice:{NAMES['SERVER_NAME']}")
    assert services[0].is_exclusive_user(f"@enclave_bot:{NAMES['SERVER_NAME']}")
    assert not services[0].is_exclusive_user(f"@enclave-admin:{NAMES['SERVER_NAME']}")


# -- Element, Caddy ---------------------------------------------------------------------------
def test_element_points_at_the_homeserver(generated) -> None:
    cfg = json.loads((generated["out"] / "element/config.json").read_text())
    hs = cfg["default_server_config"]["m.homeserver"]
    assert hs == {"base_url": f"https://{NAMES['MATRIX_HOST']}",
                  "server_name": NAMES["SERVER_NAME"]}
    svc = compose()["services"]["element"]
    assert "./generated/element/config.json:/app/config.json:ro" in svc["volumes"]


def caddy_sites() -> dict[str, str]:
    """Top-level site blocks of the Caddyfile: {address: body}."""
    sites: dict[str, str] = {}
    depth, address, body = 0, "", []
    for line in CADDYFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        # braces of placeholders ({$VAR}, {uri}) and inside `...` are not blocks
        bare = re.sub(r"`[^`]*`|\{[$\w.]+\}", "", line)
        opened, closed = bare.count("{"), bare.count("}")
        if depth == 0 and opened:
            address = line[:line.rindex("{")].strip()
            body = []
        elif depth > 0:
            body.append(line)
        depth += opened - closed
        if depth == 0 and address:
            sites[address] = "\n".join(body[:-1])
            address = ""
    return sites


def test_caddy_serves_both_well_known_answers(env_example: dict[str, str]) -> None:
    sites = caddy_sites()
    assert set(sites) >= {"{$SERVER_NAME}", "{$MATRIX_HOST}", "{$ELEMENT_HOST}"}, sites.keys()
    block = sites["{$SERVER_NAME}"]
    answers = {}
    for path, body in re.findall(
            r"handle (/\.well-known/matrix/\w+) \{(.*?)\n\t\}", block, re.S):
        assert "Content-Type application/json" in body, path
        m = re.search(r"respond `(.*?)` 200", body)
        assert m, path
        # Caddy substitutes {$VAR} from its environment: the caddy service's, from .env
        raw = re.sub(r"\{\$(\w+)\}", lambda v: env_example[v.group(1)], m.group(1))
        answers[path] = json.loads(raw)
    matrix_host = env_example["MATRIX_HOST"]
    assert answers == {
        "/.well-known/matrix/server": {"m.server": f"{matrix_host}:443"},
        "/.well-known/matrix/client": {"m.homeserver": {"base_url": f"https://{matrix_host}"}},
    }
    caddy = compose()["services"]["caddy"]
    for key in ("SERVER_NAME", "MATRIX_HOST", "ELEMENT_HOST", "ACME_EMAIL"):
        assert caddy["environment"][key] == f"${{{key}:?set {key} in .env}}"
    # the upstreams are the services' real ports
    hs = yaml.safe_load((COMPOSE_DIR / "synapse/homeserver.yaml").read_text())
    synapse_port = hs["listeners"][0]["port"]
    assert re.findall(r"reverse_proxy (\S+)", sites["{$MATRIX_HOST}"]) == [
        f"synapse:{synapse_port}"] * 2
    element_port = compose()["services"]["element"]["environment"]["ELEMENT_WEB_PORT"]
    assert re.findall(r"reverse_proxy (\S+)", sites["{$ELEMENT_HOST}"]) == [
        f"element:{element_port}"]
    # the template names agree with .env.example
    assert hs["server_name"] == env_example["SERVER_NAME"]
    assert hs["public_baseurl"] == f"https://{matrix_host}/"


# -- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_stages_user_and_entrypoint() -> None:
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder"), froms
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", args["PYTHON_IMAGE"])
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    assert ("COPY", "--from=builder /opt/enclave /opt/enclave") in final
    run = " ".join(a for i, a in final if i == "RUN")
    assert re.search(r"useradd .*--uid 10001 .*enclave", run), run
    assert [a for i, a in final if i == "USER"] == ["10001:10001"]
    assert [a for i, a in final if i == "VOLUME"] == ['["/var/lib/enclave"]']
    assert [json.loads(a) for i, a in final if i == "ENTRYPOINT"] == [["enclave"]]
    (cmd,) = [json.loads(a) for i, a in final if i == "CMD"]
    parsed = build_parser().parse_args(cmd)
    assert parsed.cmd == "run" and parsed.config == "/etc/enclave/config.yaml"
    # the builder installs a built wheel, not the source tree (no editable install)
    builder = " ".join(a for i, a in ins[:ins.index(("FROM", froms[1]))] if i == "RUN")
    assert "pip wheel" in builder and "-e " not in builder


def test_the_wheel_carries_every_data_file() -> None:
    """The image (and install-venv.sh) install the built wheel, not the checkout: every
    non-Python file of the packages must be matched by pyproject's package-data, or the
    installed Enclave lacks it (e.g. its SQL migrations: `enclave migrate` then fails)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"].get("package-data", {})
    missing = []
    for package in ("bridge", "bots"):
        pkg_dir = ROOT / package
        shipped = {p for pattern in package_data.get(package, [])
                   for p in pkg_dir.glob(pattern)}
        for path in pkg_dir.rglob("*"):
            if (path.is_file() and path.suffix not in (".py", ".pyc")
                    and "__pycache__" not in path.parts and path not in shipped):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, (
        f"not in [tool.setuptools.package-data] of pyproject.toml, so not installed: "
        f"{sorted(missing)}")


def test_dockerignore_keeps_out_everything_but_the_sources() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "start from nothing, then re-include"
    included = {ln[1:] for ln in lines if ln.startswith("!")}
    for i, a in dockerfile_instructions():
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert src in included, f"COPY {src} but .dockerignore excludes it"
    assert not included & {".venv", "var", "deploy", ".git", "tests"}


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("H", (_Health,), {"status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_works_without_curl(health_server) -> None:
    """The HEALTHCHECK's python -c, run as Docker would: 0 on 200, non-zero otherwise."""
    port, handler = health_server
    health = next(a for i, a in dockerfile_instructions() if i == "HEALTHCHECK")
    argv = json.loads(health.split(" CMD ", 1)[1])
    assert argv[:2] == ["python", "-c"] and "curl" not in health
    cmd = [sys.executable, *argv[1:]]
    env = {**os.environ, "ENCLAVE_HEALTH_URL": f"http://127.0.0.1:{port}/health"}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode == 0
    handler.status = 503
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env["ENCLAVE_HEALTH_URL"] = f"http://127.0.0.1:{closed}/health"
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0


# -- PostgreSQL init script -------------------------------------------------------------------
def _local_postgres() -> bool:
    if shutil.which("psql") is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not _local_postgres(), reason="needs psql and PostgreSQL on 127.0.0.1:5432")
def test_postgres_init_script_creates_synapse_compatible_databases(tmp_path: Path) -> None:
    """postgres/init-databases.sh against the machine's PostgreSQL (as the image runs it,
    with its own names so nothing shared is touched): Synapse's database must be UTF8 with
    C collation and ctype, which Synapse checks at start."""
    suffix = uuid.uuid4().hex[:8]
    names = {"SYNAPSE_DB": f"deploy_syn_{suffix}", "SYNAPSE_DB_USER": f"deploy_synu_{suffix}",
             "ENCLAVE_DB": f"deploy_enc_{suffix}", "ENCLAVE_DB_USER": f"deploy_encu_{suffix}"}
    (tmp_path / "syn").write_text("synapse-pw\n")
    (tmp_path / "enc").write_text("enclave-pw\n")
    env = {**os.environ, **names, "PGHOST": "127.0.0.1", "POSTGRES_USER": "postgres",
           "SYNAPSE_DB_PASSWORD_FILE": str(tmp_path / "syn"),
           "ENCLAVE_DB_PASSWORD_FILE": str(tmp_path / "enc")}

    def psql(sql: str) -> str:
        r = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres",
                            "-Atc", sql], capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    try:
        r = subprocess.run(["sh", str(COMPOSE_DIR / "postgres/init-databases.sh")], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        rows = psql("SELECT datname, datcollate, datctype, pg_encoding_to_char(encoding), "
                    "pg_get_userbyid(datdba) FROM pg_database WHERE datname IN "
                    f"('{names['SYNAPSE_DB']}', '{names['ENCLAVE_DB']}') ORDER BY datname")
        syn, enc = sorted(rows.splitlines(), key=lambda r: not r.startswith("deploy_syn"))
        assert syn.split("|") == [names["SYNAPSE_DB"], "C", "C", "UTF8",
                                  names["SYNAPSE_DB_USER"]]
        assert enc.split("|")[3:] == ["UTF8", names["ENCLAVE_DB_USER"]]
        # a password with quotes is passed as a literal, not as SQL
        assert psql(f"SELECT rolcanlogin FROM pg_roles WHERE rolname = "
                    f"'{names['SYNAPSE_DB_USER']}'") == "t"
    finally:
        for stmt in (f"DROP DATABASE IF EXISTS {names['SYNAPSE_DB']}",
                     f"DROP DATABASE IF EXISTS {names['ENCLAVE_DB']}",
                     f"DROP ROLE IF EXISTS {names['SYNAPSE_DB_USER']}",
                     f"DROP ROLE IF EXISTS {names['ENCLAVE_DB_USER']}"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres",
                            "-c", stmt], capture_output=True, timeout=30, check=False)


def test_postgres_service_runs_the_init_script_with_file_secrets() -> None:
    svc = compose()["services"]["postgres"]
    assert ("./postgres/init-databases.sh:/docker-entrypoint-initdb.d/"
            "10-init-databases.sh:ro") in svc["volumes"]
    assert svc["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert os.access(COMPOSE_DIR / "postgres/init-databases.sh", os.X_OK)
    # pg_isready over TCP, so the first start's socket-only init server is not "healthy"
    assert "127.0.0.1" in shlex.join(svc["healthcheck"]["test"])
