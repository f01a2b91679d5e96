"""The Kubernetes manifests: both overlays render with `kubectl kustomize`, every object validates against
the Kubernetes schemas (kubernetes-validate, strict: no unknown fields), and the objects carry what the
services need: probes on the health service, headless Services for the instances, grace periods longer
than the drain, the secrets mounted, a disruption budget per role."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pdserve import config as cfg

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.32.0"
PORTS = {"gateway": 50051, "prefill": 50061, "decode": 50071}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        why = "kubectl is not installed (make docker-setup installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI runs the Kubernetes tests, but {why}")
        pytest.skip(why)
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "kubernetes" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
                                         "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises, naming the field


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_objects_carry_what_the_services_need(overlay):
    docs = render(overlay)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    grace = float(by_kind(docs, "ConfigMap")["pdserve-config"]["data"]["PDSERVE_SHUTDOWN_GRACE_S"])
    assert grace > cfg.ServerConfig().shutdown_grace_s - 1e-9
    for role, port in PORTS.items():
        pod = deployments[f"pdserve-{role}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == [role]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PDSERVE_LISTEN"] == f"0.0.0.0:{port}"
        assert env["PDSERVE_TLS_CERT"] == f"/certs/{role}.pem"
        # Draining takes the grace period plus the preStop pause; the pod must be given longer.
        assert pod["terminationGracePeriodSeconds"] >= grace + 5 + 10
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["certs"] == "/certs"
        assert {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}["certs"] == "pdserve-tls"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["initContainers"][0]["args"] == ["model", "fetch"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            if role == "gateway":  # the plaintext client-facing port: Kubernetes' own gRPC probe
                assert spec["grpc"]["port"] == port
            else:  # mutual TLS only: `pdserve health` with the member's certificate (PDSERVE_TLS_*)
                assert spec["exec"]["command"] == ["pdserve", "health", "--address", f"127.0.0.1:{port}"]
        gpu = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert gpu == (1 if overlay == "gpu" and role != "gateway" else None)
        assert (env.get("PDSERVE_DEVICE") == "cuda") == (overlay == "gpu" and role != "gateway")
    gateway = deployments["pdserve-gateway"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["PDSERVE_PREFILL"] == "prefill:50061" and env["PDSERVE_DECODE"] == "decode:50071"
    assert gateway["readinessProbe"]["grpc"].get("service", "") == ""  # readiness: "" (reaches both roles)
    assert gateway["livenessProbe"]["grpc"]["service"] == "pdserve.v1.Gateway"
    # One instance per pod: the instances' Services are headless; the gateway's exposes only client APIs.
    for role in ("prefill", "decode"):
        assert services[role]["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in services[role]["spec"]["ports"]] == [PORTS[role]]
    assert sorted(p["port"] for p in services["pdserve"]["spec"]["ports"]) == [8000, 50051]
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert {b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for b in budgets.values()} == \
        {f"pdserve-{role}" for role in PORTS}
