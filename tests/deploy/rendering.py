"""Rendering the kustomize layout of deploy/ for the deployment tests.

``kubectl kustomize`` is kubectl's built-in kustomize; `.ci/run` installs kubectl when it is
missing, so these tests never skip in CI. The production overlay reads its token and
certificates from files that are never committed: ``production_copy`` renders a copy of deploy/
with stand-in files in their place.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent.name for p in (DEPLOY / "components").glob("*/kustomization.yaml"))
PRODUCTION_SECRET_FILES = ("retriever-token", "ca.crt", "retriever.crt", "retriever.key",
                           "decoder.crt", "decoder.key")  # fmt: skip
KUBERNETES_VERSION = "1.32.0"  # the oldest release still supported when this layout was written


def kustomize(directory: Path) -> list[dict]:
    """Every object ``kubectl kustomize directory`` renders."""
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def deploy_copy(tmp_path: Path) -> Path:
    """deploy/ copied to ``tmp_path``, with stand-ins for the production secret files."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    secrets = copy / "overlays" / "production" / "secrets"
    for name in PRODUCTION_SECRET_FILES:
        (secrets / name).write_text(f"stand-in for {name}\n")
    return copy


def render_overlay(name: str, tmp_path: Path) -> list[dict]:
    return kustomize(deploy_copy(tmp_path) / "overlays" / name)


def render_component_alone(name: str, tmp_path: Path) -> list[dict]:
    """The base with only ``name`` on top, and the Secrets the components need, as
    microservices-demo's CI builds each component on its own."""
    copy = deploy_copy(tmp_path)
    kustomization = copy / "only-component"
    kustomization.mkdir()
    (kustomization / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "rest-test",
        "resources": ["../base"],
        "components": [f"../components/{name}"],
        "secretGenerator": [
            {"name": "rest-retriever-token", "literals": ["token=test"]},
            {"name": "rest-retriever-tls", "literals": ["tls.crt=x", "tls.key=x", "ca.crt=x"]},
            {"name": "rest-decoder-tls", "literals": ["tls.crt=x", "tls.key=x", "ca.crt=x"]},
        ],
    }))  # fmt: skip
    return kustomize(kustomization)


def pod_templates(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod spec) for every object that runs pods."""
    out = []
    for obj in objects:
        kind = obj["kind"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            out.append((obj, obj["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            out.append((obj, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif kind == "Pod":
            out.append((obj, obj["spec"]))
    return out


def containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def named(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}
