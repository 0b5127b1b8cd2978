"""The kustomize base under k8s/, rendered by `kubectl kustomize` (offline) and checked:
every object valid against the Kubernetes schemas of a pinned version (strict: unknown
fields fail), requests and limits and probes on every container, pinned image tags,
credentials from the Secret, the trainer on a GPU node and real `ctscan serve` commands."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from .conftest import REPO_ROOT

KUBERNETES_VERSION = "1.33.0"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
SERVES = {"inference": "inference", "web": "web", "trainer": "worker"}
SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEB_SECRET_KEY", "WEB_ADMIN_PASSWORD",
                    "CTSCAN_ADMIN_TOKEN", "WEB_INFERENCE_API_KEY"}


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: it renders the kustomization offline (kubectl kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(REPO_ROOT / "k8s")], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def containers(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for doc in manifests:
        if doc["kind"] in WORKLOADS:
            pod = doc["spec"]["template"]["spec"]
            for container in pod.get("initContainers", []) + pod["containers"]:
                found.append((doc["metadata"]["name"], pod, container))
    return found


def test_every_object_is_valid_for_the_pinned_kubernetes_version(manifests: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    errors = []
    for doc in manifests:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_expected_objects_in_one_namespace(manifests: list[dict[str, Any]]) -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in manifests}
    for wanted in [("Namespace", "ctscan"), ("ConfigMap", "ctscan-config"), ("Secret", "ctscan-secrets"),
                   ("Deployment", "inference"), ("Deployment", "web"), ("Deployment", "trainer"),
                   ("StatefulSet", "redis"), ("Service", "inference"), ("Service", "web"), ("Service", "redis"),
                   ("Ingress", "ctscan"), ("HorizontalPodAutoscaler", "inference"), ("Job", "admin-init")]:
        assert wanted in kinds, f"missing {wanted}"
    for doc in manifests:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "ctscan", f"{doc['kind']}/{doc['metadata']['name']}"


def test_containers_have_resources_probes_and_pinned_images(manifests: list[dict[str, Any]]) -> None:
    for workload, pod, container in containers(manifests):
        where = f"{workload}/{container['name']}"
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part} needs cpu and memory"
        assert "livenessProbe" in container, f"{where}: no liveness probe"
        if container.get("ports"):  # serves traffic: must say when it is ready
            assert "readinessProbe" in container, f"{where}: no readiness probe"
            assert all(port.get("name") for port in container["ports"]), f"{where}: unnamed port"
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{where}: image {image} has no pinned tag"
        assert pod["securityContext"].get("runAsNonRoot") is True, f"{where}: may run as root"
        assert container["securityContext"].get("allowPrivilegeEscalation") is False, where


def test_inference_slow_start_and_autoscaling(manifests: list[dict[str, Any]]) -> None:
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in manifests}
    inference = by_name[("Deployment", "inference")]["spec"]["template"]["spec"]["containers"][0]
    startup = inference["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "model loading needs minutes"
    assert inference["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = by_name[("HorizontalPodAutoscaler", "inference")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "inference"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_trainer_runs_on_a_gpu_node(manifests: list[dict[str, Any]]) -> None:
    trainer = next(doc for doc in manifests if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "trainer")
    pod = trainer["spec"]["template"]["spec"]
    assert pod["nodeSelector"], "trainer needs a GPU node selector"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    container = pod["containers"][0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "trainer-cuda" in container["image"]


def test_commands_are_ctscan_serve_entry_points(manifests: list[dict[str, Any]], check_serve_command) -> None:
    seen = set()
    for workload, _, container in containers(manifests):
        if workload in SERVES:
            check_serve_command(container["command"] + container.get("args", []), SERVES[workload])
            seen.add(workload)
    assert seen == set(SERVES)


def test_set_up_writes_the_admin_verifier_from_the_secret(manifests: list[dict[str, Any]]) -> None:
    # Admin commands are refused on a store without the verifier (ctscan.access.admin_credential).
    [(_, _, container)] = [entry for entry in containers(manifests) if entry[0] == "admin-init"]
    assert container["command"] == ["ctscan", "admin", "init"]
    token = next(v for v in container["env"] if v["name"] == "CTSCAN_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "ctscan-secrets", "key": "CTSCAN_ADMIN_TOKEN"}


def test_credentials_come_from_the_secret(manifests: list[dict[str, Any]]) -> None:
    for doc in manifests:
        if doc["kind"] == "ConfigMap":
            assert not SECRET_VARIABLES & set(doc["data"]), "secrets in the ConfigMap"
    for workload, _, container in containers(manifests):
        for variable in container.get("env", []):
            if variable["name"] in SECRET_VARIABLES:
                assert "secretKeyRef" in variable.get("valueFrom", {}), f"{workload}: {variable['name']} inline"
    services_needing_s3 = {"inference", "trainer"}
    for workload, _, container in containers(manifests):
        if workload in services_needing_s3:
            names = {v["name"] for v in container.get("env", [])}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, workload


def _allowed_sources(policies: list[dict[str, Any]], target: str, port: int) -> set[str]:
    """Who the NetworkPolicies let reach pods named `target` on `port`: pod names and
    namespace names (as "ns:NAME")."""
    sources: set[str] = set()
    for policy in policies:
        if policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") != target:
            continue
        for rule in policy["spec"].get("ingress", []):
            if port not in {p["port"] for p in rule.get("ports", [])}:
                continue
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    sources.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
                if "namespaceSelector" in peer:
                    sources.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return sources


def test_network_policies_let_only_the_right_pods_in(manifests: list[dict[str, Any]]) -> None:
    policies = [doc for doc in manifests if doc["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default deny for the namespace"
    assert _allowed_sources(policies, "inference", 8000) == {"ns:ingress-nginx", "web", "ns:monitoring"}
    assert _allowed_sources(policies, "web", 8080) == {"ns:ingress-nginx"}
    assert _allowed_sources(policies, "redis", 6379) == {"trainer", "web"}
    assert _allowed_sources(policies, "trainer", 8000) == set()
    # Every selector names pods that exist.
    pods = {doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for doc in manifests if doc["kind"] in ("Deployment", "StatefulSet")}
    assert {"inference", "web", "redis", "trainer"} <= pods


def test_ingress_publishes_the_api_but_not_metrics(manifests: list[dict[str, Any]]) -> None:
    ingress = next(doc for doc in manifests if doc["kind"] == "Ingress")
    api = next(rule for rule in ingress["spec"]["rules"] if rule["host"].startswith("api."))
    paths = {entry["path"] for entry in api["http"]["paths"]}
    assert "/predict" in paths and "/models" in paths
    assert "/" not in paths and not any(path.startswith("/metrics") for path in paths)
    config = next(doc for doc in manifests if doc["kind"] == "ConfigMap")["data"]
    assert config["INFERENCE_AUTH"] == "keys" and config["WEB_AUTH"] in ("accounts", "proxy")
    assert config["WEB_SESSION_COOKIE_SECURE"] == "true"


def test_audit_trail_is_on_a_shared_persistent_volume(manifests: list[dict[str, Any]]) -> None:
    claim = next(doc for doc in manifests if doc["kind"] == "PersistentVolumeClaim"
                 and doc["metadata"]["name"] == "ctscan-audit")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica appends its own file
    audit_dir = next(doc for doc in manifests if doc["kind"] == "ConfigMap")["data"]["CTSCAN_AUDIT_DIR"]
    for workload, pod, container in containers(manifests):
        if workload in ("inference", "web"):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts[audit_dir]]["persistentVolumeClaim"]["claimName"] == "ctscan-audit", workload
