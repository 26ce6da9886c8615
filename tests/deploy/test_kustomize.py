"""deploy/: every overlay and every component renders, every object is valid for Kubernetes,
every pod runs with least privilege, and every reference points at something that exists."""

from __future__ import annotations

import functools

import kubernetes_validate
import pytest

from tests.deploy.rendering import (
    COMPONENTS,
    KUBERNETES_VERSION,
    OVERLAYS,
    containers,
    kustomize,
    DEPLOY,
    named,
    pod_templates,
    render_component_alone,
    render_overlay,
)

RENDERINGS = [("overlay", name) for name in OVERLAYS] + [("component", n) for n in COMPONENTS]


@functools.lru_cache(maxsize=None)
def _rendered(kind: str, name: str, tmp_root: str) -> tuple:
    from pathlib import Path

    path = Path(tmp_root) / f"{kind}-{name}"
    path.mkdir(parents=True, exist_ok=True)
    render = render_overlay if kind == "overlay" else render_component_alone
    return tuple(render(name, path))


@pytest.fixture(params=RENDERINGS, ids=[f"{k}-{n}" for k, n in RENDERINGS])
def objects(request, tmp_path_factory) -> list[dict]:
    kind, name = request.param
    return list(_rendered(kind, name, str(tmp_path_factory.getbasetemp() / "renders")))


def test_the_layout_has_a_dev_and_a_production_overlay_and_the_four_components():
    assert {"dev", "production"} <= set(OVERLAYS)
    assert {"tls", "prometheus", "otel-collector", "search-port"} <= set(COMPONENTS)


def test_base_renders_on_its_own():
    kinds = {obj["kind"] for obj in kustomize(DEPLOY / "base")}
    assert {"Deployment", "Service", "Job", "ConfigMap", "ServiceAccount", "NetworkPolicy",
            "PodDisruptionBudget", "PersistentVolumeClaim"} <= kinds  # fmt: skip


def test_every_object_is_valid_against_the_kubernetes_schemas(objects):
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {exc.path}")


def test_overlays_live_in_their_own_namespace(tmp_path):
    for overlay in OVERLAYS:
        objects = render_overlay(overlay, tmp_path / overlay)
        namespaces = named(objects, "Namespace")
        assert len(namespaces) == 1, f"{overlay} must create its own namespace"
        (namespace,) = namespaces
        assert namespace not in ("default", "kube-system")
        assert namespaces[namespace]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] \
            == "restricted"
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]


def test_every_pod_runs_with_least_privilege(objects):
    service_accounts = named(objects, "ServiceAccount")
    for workload, pod in pod_templates(objects):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, where
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert isinstance(security.get("runAsUser"), int) and security["runAsUser"] > 0, where
        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), where
        assert not any("hostPath" in volume for volume in pod.get("volumes", [])), where
        account = pod.get("serviceAccountName")
        assert account in service_accounts, f"{where}: its ServiceAccount must be declared"
        assert pod.get("automountServiceAccountToken") is False, where
        assert service_accounts[account].get("automountServiceAccountToken") is False, account
        for container in containers(pod):
            at = f"{where} container {container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, at
            assert context.get("readOnlyRootFilesystem") is True, at
            assert context.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not context.get("capabilities", {}).get("add"), at
            assert not context.get("privileged"), at
            assert context.get("runAsNonRoot", security.get("runAsNonRoot")) is True, at
            assert not container["image"].endswith(":latest"), at
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), at
            assert "memory" in resources.get("limits", {}), at


def test_long_running_containers_have_probes(objects):
    for workload, pod in pod_templates(objects):
        if workload["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        for container in pod["containers"]:
            at = f"{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, at


def _references(pod: dict) -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {"ConfigMap": set(), "Secret": set(),
                                 "PersistentVolumeClaim": set()}  # fmt: skip
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            refs["ConfigMap"].add(volume["configMap"]["name"])
        if "secret" in volume:
            refs["Secret"].add(volume["secret"]["secretName"])
        if "persistentVolumeClaim" in volume:
            refs["PersistentVolumeClaim"].add(volume["persistentVolumeClaim"]["claimName"])
    for container in containers(pod):
        for env in container.get("env", []):
            source = env.get("valueFrom", {})
            if "configMapKeyRef" in source:
                refs["ConfigMap"].add(source["configMapKeyRef"]["name"])
            if "secretKeyRef" in source:
                refs["Secret"].add(source["secretKeyRef"]["name"])
        for env_from in container.get("envFrom", []):
            if "configMapRef" in env_from:
                refs["ConfigMap"].add(env_from["configMapRef"]["name"])
            if "secretRef" in env_from:
                refs["Secret"].add(env_from["secretRef"]["name"])
    return refs


def test_every_referenced_secret_config_map_and_claim_exists(objects):
    for workload, pod in pod_templates(objects):
        for kind, names in _references(pod).items():
            missing = names - set(named(objects, kind))
            assert not missing, f"{workload['metadata']['name']} uses missing {kind} {missing}"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_and_budgets_select_pods_and_name_their_ports(objects):
    templates = [(w, w["spec"]["template"]) for w, _ in pod_templates(objects)
                 if w["kind"] != "Job"]  # fmt: skip
    for service in named(objects, "Service").values():
        chosen = [t for _, t in templates
                  if _matches(service["spec"]["selector"], t["metadata"]["labels"])]  # fmt: skip
        assert chosen, f"Service {service['metadata']['name']} selects no pod"
        port_names = {p.get("name") for t in chosen for c in t["spec"]["containers"]
                      for p in c.get("ports", [])}  # fmt: skip
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert isinstance(target, int) or target in port_names, (service["metadata"], target)
    for budget in named(objects, "PodDisruptionBudget").values():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(_matches(selector, t["metadata"]["labels"]) for _, t in templates), budget


def test_only_decoders_reach_the_retrievers(objects):
    policies = named(objects, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) ==
               {"Ingress", "Egress"} and not p["spec"].get("ingress") for p in policies.values()), \
        "a default-deny policy for the namespace"  # fmt: skip
    for policy in policies.values():
        spec = policy["spec"]
        selects_retrievers = spec["podSelector"].get("matchLabels", {}).get(
            "app.kubernetes.io/component") == "retriever"
        if not selects_retrievers or "Ingress" not in spec["policyTypes"]:
            continue
        for rule in spec.get("ingress", []):
            for peer in rule["from"]:
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                assert labels == {"app.kubernetes.io/component": "decoder"}, policy["metadata"]


def test_every_shard_has_replicas_spread_a_headless_service_and_a_budget(objects):
    deployments = named(objects, "Deployment")
    shards = [d for d in deployments.values()
              if d["metadata"]["labels"].get("app.kubernetes.io/component") == "retriever"]
    assert len(shards) >= 2
    services, budgets = named(objects, "Service"), named(objects, "PodDisruptionBudget")
    for deployment in shards:
        name = deployment["metadata"]["name"]
        shard = deployment["metadata"]["labels"]["rest.dev/shard"]
        assert f"--shard={shard}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        terms = [t.get("podAffinityTerm", t) for key in anti for t in anti[key]]
        assert any(t["labelSelector"]["matchLabels"] == {"rest.dev/shard": shard}
                   and t["topologyKey"] == "kubernetes.io/hostname" for t in terms), name
        assert services[name]["spec"]["clusterIP"] == "None", f"{name}: a headless Service"
        assert name in budgets
