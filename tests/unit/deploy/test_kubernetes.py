"""deploy/kubernetes, checked without a cluster.

Each pod's filesystem is emulated from its volumes (ConfigMaps from the kustomization's
configMapGenerator, Secrets from what create-secrets.sh writes, emptyDirs shared between
the init containers and the containers), every path in the configs and arguments is moved
under that root, and then: Enclave's config is loaded by Enclave's loader, the Synapse
init container's script is run for real (`enclave registration` and the gate module copy),
and every Synapse process's config is loaded by Synapse's own loader.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import build_parser
from bridge.config import check_secrets, load_config

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "kubernetes"
CREATE_SECRETS = K8S / "create-secrets.sh"


# -- reading the manifests --------------------------------------------------------------------
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resources() -> list[dict[str, Any]]:
    docs = []
    for rel in kustomization()["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / rel).read_text()) if d)
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def deployments() -> list[dict[str, Any]]:
    return [d for d in resources() if d["kind"] == "Deployment"]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def config_maps() -> dict[str, dict[str, Path]]:
    """configMapGenerator: {name: {key: file}}."""
    out = {}
    for gen in kustomization()["configMapGenerator"]:
        files = {}
        for entry in gen["files"]:
            key, _, rel = entry.rpartition("=") if "=" in entry else ("", "", entry)
            files[key or Path(rel).name] = K8S / rel
        out[gen["name"]] = files
    return out


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], port
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def server_name() -> str:
    return yaml.safe_load((K8S / "synapse/homeserver.yaml").read_text())["server_name"]


# -- emulated pods ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """create-secrets.sh run for real (--print): {secret name: {key: file}}."""
    base = tmp_path_factory.mktemp("k8s-secrets")
    result = subprocess.run(
        ["bash", str(CREATE_SECRETS), "--pg-host", "db.internal.test", "--dir",
         str(base / "values"), "--print"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    out: dict[str, dict[str, Path]] = {}
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        assert words[:6] == ["kubectl", "-n", "enclave", "create", "secret", "generic"], line
        keys = {}
        for w in words[7:]:
            key, _, path = w.removeprefix("--from-file=").partition("=")
            assert Path(path).is_file(), path
            keys[key] = Path(path)
        out[words[6]] = keys
    return out


def pod_volumes(dep: dict[str, Any], secrets: dict[str, dict[str, Path]],
                root: Path) -> dict[str, Path]:
    """Lay out the pod's volumes under root: {volume name: its folder}."""
    pod = dep["spec"]["template"]["spec"]
    cms = config_maps()
    out = {}
    for vol in pod["volumes"]:
        files: dict[str, Path] = {}
        if "configMap" in vol:
            files = dict(cms[vol["configMap"]["name"]])
        elif "secret" in vol:
            files = dict(secrets[vol["secret"]["secretName"]])
        elif "projected" in vol:
            for src in vol["projected"]["sources"]:
                s = secrets[src["secret"]["name"]]
                for item in src["secret"]["items"]:
                    assert item["key"] in s, f"Secret {src['secret']['name']} has no {item['key']}"
                    files[item["path"]] = s[item["key"]]
        else:
            assert "emptyDir" in vol or "persistentVolumeClaim" in vol, vol
        folder = root / "volumes" / vol["name"]
        folder.mkdir(parents=True)
        for key, src in files.items():
            shutil.copy(src, folder / key)
        out[vol["name"]] = folder
    return out


def container_mounts(container: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Path]:
    """What one container sees: {mountPath: folder or file}."""
    out = {}
    for m in container.get("volumeMounts", []):
        assert m["name"] in volumes, f"{container['name']} mounts unknown volume {m['name']}"
        assert m["mountPath"] not in out, f"{container['name']} mounts {m['mountPath']} twice"
        out[m["mountPath"]] = volumes[m["name"]] / m.get("subPath", "")
    return out


def relocate(text: str, mounts: dict[str, Path]) -> str:
    """Every mounted path in text moved under the pod's root (one pass, longest first)."""
    paths = sorted(mounts, key=len, reverse=True)
    pattern = r"(?<![\w/.-])(" + "|".join(re.escape(p) for p in paths) + r")(?=/|\b|$)"
    return re.sub(pattern, lambda m: str(mounts[m.group(1)]), text)


# -- images, structure ------------------------------------------------------------------------
def test_kustomization_files_exist() -> None:
    for rel in kustomization()["resources"]:
        assert (K8S / rel).is_file(), rel
    for files in config_maps().values():
        for path in files.values():
            assert path.is_file(), path
    names = {d["kind"] for d in resources()}
    assert {"Namespace", "Deployment", "Service", "Ingress", "ConfigMap"} - names == {
        "ConfigMap"}, names
    assert kustomization()["namespace"] == find("Namespace", "enclave")["metadata"]["name"]


def test_every_image_is_pinned() -> None:
    images = [c["image"] for d in deployments()
              for c in all_containers(d["spec"]["template"]["spec"])]
    assert len(images) >= 10
    for image in images:
        name, sep, tag = image.rpartition(":")
        assert sep and name and "/" not in tag, f"{image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"
    for override in kustomization().get("images", []):
        assert override["newTag"] != "latest" and re.search(r"\d", override["newTag"])
        assert override["name"] in {i.rpartition(":")[0] for i in images}, override


def test_generated_secret_values_are_git_ignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("git not available to check the ignore rules")
    paths = ["deploy/kubernetes/secrets/as_token", "deploy/kubernetes/secrets/database.yaml",
             "deploy/kubernetes/secrets/postgres-setup.sql"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert sorted(result.stdout.split()) == sorted(paths), result.stdout
    # and the default --dir of create-secrets.sh is that folder
    assert 'DIR="$HERE/secrets"' in CREATE_SECRETS.read_text()


def test_referenced_config_maps_and_secrets_exist(secrets) -> None:
    cms = config_maps()
    for dep in deployments():
        for vol in dep["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in cms, vol
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets, vol
            for src in vol.get("projected", {}).get("sources", []):
                assert src["secret"]["name"] in secrets, src
                for item in src["secret"]["items"]:
                    assert item["key"] in secrets[src["secret"]["name"]], item


def test_every_pod_runs_unprivileged() -> None:
    """What the namespace's `restricted` Pod Security level demands."""
    ns = find("Namespace", "enclave")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for dep in deployments():
        pod = dep["spec"]["template"]["spec"]
        name = dep["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert isinstance(pod["securityContext"]["runAsUser"], int), name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in all_containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])


# -- Enclave ----------------------------------------------------------------------------------
def enclave_config() -> dict[str, Any]:
    return yaml.safe_load((K8S / "enclave/config.yaml").read_text())


def test_enclave_deployment() -> None:
    dep = find("Deployment", "enclave")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    parser = build_parser()
    init_args, main_args = parser.parse_args(init["args"]), parser.parse_args(main["args"])
    assert init_args.cmd == "migrate" and main_args.cmd == "run" and main_args.no_migrate
    assert init_args.config == main_args.config == "/etc/enclave/config.yaml"
    assert "command" not in init and "command" not in main  # the image's ENTRYPOINT
    assert init["image"] == main["image"]
    for c in (init, main):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    port = enclave_config()["appservice"]["port"]
    ready, live = main["readinessProbe"]["httpGet"], main["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready" and live["path"] == "/health"
    assert container_port(main, ready["port"]) == container_port(main, live["port"]) == port
    assert main["startupProbe"]["httpGet"]["path"] == "/health"
    # mounted config is the generated ConfigMap, read-only
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts["/etc/enclave"]["readOnly"] is True
    assert find("PodDisruptionBudget", "enclave")["spec"]["minAvailable"] == 1


def test_enclave_service_is_the_registration_url() -> None:
    cfg = enclave_config()
    port = cfg["appservice"]["port"]
    svc = find("Service", "enclave")
    dep = find("Deployment", "enclave")
    (main,) = dep["spec"]["template"]["spec"]["containers"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    (sp,) = svc["spec"]["ports"]
    assert container_port(main, sp["targetPort"]) == port
    assert cfg["appservice"]["public_url"] == f"http://{svc['metadata']['name']}:{sp['port']}"
    assert cfg["appservice"]["bind_host"] == "0.0.0.0"
    hs = yaml.safe_load((K8S / "synapse/homeserver.yaml").read_text())
    gate = next(m for m in hs["modules"] if m["module"] == "enclave_gate.EnclaveGate")
    assert gate["config"]["url"] == cfg["appservice"]["public_url"]


def test_enclave_config_validates_in_its_pod(secrets, tmp_path: Path) -> None:
    """As the init container (migrate) and the container (run) each see it."""
    dep = find("Deployment", "enclave")
    pod = dep["spec"]["template"]["spec"]
    volumes = pod_volumes(dep, secrets, tmp_path / "pod")
    for c in all_containers(pod):
        mounts = container_mounts(c, volumes)
        cfg_path = tmp_path / f"{c['name']}.yaml"
        cfg_path.write_text(relocate((mounts["/etc/enclave"] / "config.yaml").read_text(),
                                     mounts))
        loaded = load_config(cfg_path)
        found = check_secrets(loaded)
        assert set(found) == {"appservice.as_token", "appservice.hs_token",
                              "database.password", "homeserver.registration_shared_secret",
                              "gate.secret"}, c["name"]
    cfg = loaded.config
    # two replicas need PostgreSQL (a SQLite store refuses a second `enclave run`)
    assert cfg.database.url.startswith("postgresql://")
    assert cfg.cluster.lease_ttl_seconds == enclave_config()["cluster"]["lease_ttl_seconds"]
    assert cfg.homeserver.server_name == server_name()
    svc = find("Service", "synapse-main")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
    assert cfg.homeserver.url == f"http://synapse-main:{port}"


# -- Synapse ----------------------------------------------------------------------------------
SYNAPSE_DEPLOYMENTS = ["synapse-main", "synapse-generic-worker-1", "synapse-event-persister-1",
                       "synapse-federation-sender-1"]


def synapse_args(dep: dict[str, Any]) -> list[str]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "run", "start.py's run mode"
    return c["args"][1:]


def test_synapse_processes_match_the_worker_config() -> None:
    hs = yaml.safe_load((K8S / "synapse/homeserver.yaml").read_text())
    cms = config_maps()["synapse-config"]
    workers = {}
    for dep_name in SYNAPSE_DEPLOYMENTS:
        dep = find("Deployment", dep_name)
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["PYTHONPATH"] == "/enclave-assets"
        files = [a.removeprefix("--config-path=/config/") for a in synapse_args(dep)
                 if a.startswith("--config-path=/config/")]
        assert files[0] == "homeserver.yaml" and "--no-secrets-in-config" in c["args"]
        assert "--config-path=/run/secrets/synapse/database.yaml" in c["args"]
        if dep_name == "synapse-main":
            assert files == ["homeserver.yaml"]
            assert env["SYNAPSE_WORKER"] == "synapse.app.homeserver"
            continue
        (worker_file,) = files[1:]
        worker = yaml.safe_load(cms[worker_file].read_text())
        assert env["SYNAPSE_WORKER"] == worker["worker_app"] == "synapse.app.generic_worker"
        assert dep_name == f"synapse-{worker['worker_name']}"
        workers[worker["worker_name"]] = (dep, worker)
        # every listener is a container port
        for listener in worker.get("worker_listeners", []):
            assert container_port(c, listener["port"]) == listener["port"]
    assert set(hs["stream_writers"]["events"]) <= set(workers)
    assert set(hs["federation_sender_instances"]) <= set(workers)
    # instance_map: a Service per process whose port is that process's replication listener
    for name, where in hs["instance_map"].items():
        svc = find("Service", where["host"])
        (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == where["port"]]
        if name == "main":
            listeners = hs["listeners"]
            selector = find("Deployment", "synapse-main")["spec"]["selector"]["matchLabels"]
        else:
            listeners = workers[name][1]["worker_listeners"]
            selector = workers[name][0]["spec"]["selector"]["matchLabels"]
        assert svc["spec"]["selector"] == selector
        (repl,) = [lst for lst in listeners
                   if lst["resources"][0]["names"] == ["replication"]]
        assert sp["targetPort"] == repl["port"]
    assert hs["redis"]["host"] == find("Service", "redis")["metadata"]["name"]


@pytest.mark.parametrize("dep_name", SYNAPSE_DEPLOYMENTS)
def test_synapse_config_loads_in_synapse(dep_name: str, secrets, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod as Kubernetes would lay it out: the init container's script runs for real
    (`enclave registration` from Enclave's config and tokens, the gate module copied out
    of the installed package), then Synapse's loader reads the process's config files."""
    pytest.importorskip("synapse.config.homeserver")
    import synapse.config.redis
    from synapse.config.appservice import load_appservices
    from synapse.config.homeserver import HomeServerConfig

    dep = find("Deployment", dep_name)
    pod = dep["spec"]["template"]["spec"]
    volumes = pod_volumes(dep, secrets, tmp_path / "pod")
    (init,) = pod["initContainers"]
    (c,) = pod["containers"]
    init_mounts, mounts = container_mounts(init, volumes), container_mounts(c, volumes)

    # the init container: Enclave's config as it sees it, its script as it runs it
    enclave_cfg = init_mounts["/etc/enclave"] / "config.yaml"
    enclave_cfg.write_text(relocate(enclave_cfg.read_text(), init_mounts))
    assert init["command"][:2] == ["/bin/sh", "-ec"]
    script = relocate(init["command"][2], init_mounts)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    env.pop("ENCLAVE_CONFIG", None)
    result = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (mounts["/enclave-assets"] / "enclave_gate.py").read_text() == (
        ROOT / "bridge/gate/module.py").read_text()

    # Synapse: its config files as it sees them
    for f in mounts["/config"].iterdir():
        f.write_text(relocate(f.read_text(), mounts))
    pythonpath = next(e["value"] for e in c["env"] if e["name"] == "PYTHONPATH")
    monkeypatch.syspath_prepend(relocate(pythonpath, mounts))
    monkeypatch.delitem(sys.modules, "enclave_gate", raising=False)
    # the image has txredisapi (Synapse's redis extra); this venv need not
    monkeypatch.setattr(synapse.config.redis, "check_requirements", lambda *a, **k: None)
    args = [relocate(a, mounts) for a in synapse_args(dep)]
    config = HomeServerConfig.load_config(dep_name, args)
    monkeypatch.delitem(sys.modules, "enclave_gate", raising=False)

    assert config.server.server_name == server_name()
    db = config.database.databases[0].config
    assert db["name"] == "psycopg2" and db["args"]["host"] == "db.internal.test"
    assert config.redis.redis_enabled
    assert config.worker.worker_replication_secret
    ((module, _),) = config.modules.loaded_modules
    assert module.__name__ == "EnclaveGate"
    if dep_name != "synapse-main":
        assert config.worker.worker_name == dep_name.removeprefix("synapse-")
    (service,) = load_appservices(config.server.server_name,
                                  config.appservice.app_service_config_files)
    assert service.url == enclave_config()["appservice"]["public_url"]
    assert service.token == secrets["enclave-appservice"]["as_token"].read_text().strip()
    assert service.hs_token == secrets["enclave-appservice"]["hs_token"].read_text().strip()


# -- Ingress, Element -------------------------------------------------------------------------
def test_ingress_routes_and_well_known() -> None:
    hs = yaml.safe_load((K8S / "synapse/homeserver.yaml").read_text())
    ing = find("Ingress", "matrix")
    rules = {r["host"]: r["http"]["paths"] for r in ing["spec"]["rules"]}
    matrix_host = re.fullmatch(r"https://([^/]+)/", hs["public_baseurl"]).group(1)
    element = yaml.safe_load((K8S / "element/config.json").read_text())
    assert element["default_server_config"]["m.homeserver"] == {
        "base_url": f"https://{matrix_host}", "server_name": hs["server_name"]}
    (tls,) = ing["spec"]["tls"]
    assert set(tls["hosts"]) == set(rules)
    # /.well-known/matrix/* on the server name, answered by Synapse itself
    (wk,) = rules[hs["server_name"]]
    assert wk["path"] == "/.well-known/matrix" and wk["pathType"] == "Prefix"
    assert wk["backend"]["service"]["name"] == "synapse-main"
    assert hs["serve_server_wellknown"] is True
    client_listener = next(lst for lst in hs["listeners"]
                           if "client" in lst["resources"][0]["names"])
    assert wk["backend"]["service"]["port"]["number"] == client_listener["port"]
    paths = {p["path"]: p["backend"]["service"]["name"] for p in rules[matrix_host]}
    assert paths["/_matrix"] == "synapse-main"
    assert paths["/_matrix/client/v3/sync"] == "synapse-generic-worker-1"
    assert paths["/_matrix/federation"] == "synapse-generic-worker-1"
    # every backend is a Service with that port
    for host_paths in rules.values():
        for p in host_paths:
            backend = p["backend"]["service"]
            svc = find("Service", backend["name"])
            assert backend["port"]["number"] in [sp["port"] for sp in svc["spec"]["ports"]]
    element_host = next(h for h in rules if h not in (matrix_host, hs["server_name"]))
    assert rules[element_host][0]["backend"]["service"]["name"] == "element"


def test_element_listens_where_its_service_sends() -> None:
    dep = find("Deployment", "element")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    (sp,) = find("Service", "element")["spec"]["ports"]
    assert container_port(c, "http") == int(env["ELEMENT_WEB_PORT"]) == sp["targetPort"]
    assert int(env["ELEMENT_WEB_PORT"]) >= 1024, "non-root nginx cannot bind a low port"
    mount = c["volumeMounts"][0]
    assert (mount["mountPath"], mount["subPath"]) == ("/app/config.json", "config.json")


def test_services_select_their_deployments() -> None:
    deps = deployments()
    for svc in (d for d in resources() if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        matches = [d for d in deps
                   if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)}"
        (c, *_) = matches[0]["spec"]["template"]["spec"]["containers"]
        for sp in svc["spec"]["ports"]:
            container_port(c, sp["targetPort"])
