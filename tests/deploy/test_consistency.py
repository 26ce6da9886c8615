"""deploy/ agrees with the programs it runs: every container's entry point is a console script,
its arguments parse with that program's own click command, its ports and probes are the ports
those arguments open, and every environment variable it sets is read by something."""

from __future__ import annotations

import re
from pathlib import Path

import opentelemetry.environment_variables
import opentelemetry.sdk.environment_variables
import pytest

from tests.deploy.programs import (
    command_of,
    console_scripts,
    environment_variables,
    parse,
    resolve,
)
from tests.deploy.rendering import (
    COMPONENTS,
    DEPLOY,
    OVERLAYS,
    containers,
    named,
    pod_templates,
    render_component_alone,
    render_overlay,
)

IMAGES = DEPLOY / "images"
# The project's images, by the name the base gives them (overlays rename them, keeping the name).
DOCKERFILES = {"retriever": IMAGES / "retriever.Dockerfile", "decoder": IMAGES / "decoder.Dockerfile"}
OTEL_VARIABLES = {
    name for module in (opentelemetry.environment_variables, opentelemetry.sdk.environment_variables)
    for name in dir(module) if name.startswith("OTEL_")
}  # fmt: skip
# Variables read by libraries rather than by our click options, each with who reads it.
LIBRARY_VARIABLES = {
    "HF_HOME": "huggingface_hub: where downloads and caches go",
    "HF_HUB_OFFLINE": "huggingface_hub: never reach a hub at run time",
    "RAYON_NUM_THREADS": "rayon, the engine's thread pool (builds, batch searches)",
}


def dockerfile_entrypoint(path: Path) -> list[str]:
    import json

    lines = [line for line in path.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1, f"{path.name}: one ENTRYPOINT, in exec form"
    return json.loads(lines[0].removeprefix("ENTRYPOINT").strip())


def dockerfile_exposed(path: Path) -> set[int]:
    ports: set[int] = set()
    for line in path.read_text().splitlines():
        if line.startswith("EXPOSE"):
            ports.update(int(p.split("/")[0]) for p in line.split()[1:])
    return ports


def image_kind(image: str) -> str | None:
    match = re.search(r"rest[-/](retriever|decoder)(:|$)", image)
    return match.group(1) if match else None


def our_containers(objects):
    for workload, pod in pod_templates(objects):
        for container in containers(pod):
            kind = image_kind(container["image"])
            if kind is not None:
                yield workload, pod, container, kind


def program_and_args(container: dict, kind: str) -> tuple[str, list[str]]:
    argv = list(container.get("command") or dockerfile_entrypoint(DOCKERFILES[kind]))
    argv += list(container.get("args", []))
    return argv[0], argv[1:]


RENDERINGS = [("overlay", name) for name in OVERLAYS] + [("component", n) for n in COMPONENTS]


@pytest.fixture(params=RENDERINGS, ids=[f"{k}-{n}" for k, n in RENDERINGS])
def objects(request, tmp_path):
    kind, name = request.param
    render = render_overlay if kind == "overlay" else render_component_alone
    return render(name, tmp_path)


def test_image_entry_points_are_console_scripts():
    scripts = console_scripts()
    for kind, path in DOCKERFILES.items():
        (program,) = dockerfile_entrypoint(path)
        assert program in scripts, f"{path.name} runs {program}, which pyproject does not install"
    assert dockerfile_entrypoint(DOCKERFILES["retriever"]) == ["retriever-server"]
    assert dockerfile_entrypoint(DOCKERFILES["decoder"]) == ["decoder-server"]


def test_every_container_runs_a_program_with_arguments_it_accepts(objects):
    scripts = console_scripts()
    seen = set()
    for workload, _, container, kind in our_containers(objects):
        program, args = program_and_args(container, kind)
        assert program in scripts, f"{workload['metadata']['name']} runs unknown {program}"
        command, own_args = resolve(command_of(program), args)
        parse(command, own_args)  # raises on an unknown option or a bad value
        seen.add(program)
    assert {"retriever-server", "decoder-server"} <= seen


def _port(container: dict, name: str) -> int | None:
    for port in container.get("ports", []):
        if port.get("name") == name:
            return port["containerPort"]
    return None


def _probe_ports(container: dict) -> list[int | str]:
    out = []
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(key)
        if probe:
            handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
            out.append(handler["port"])
    return out


def test_ports_and_probes_are_the_ports_the_arguments_open(objects):
    for workload, pod, container, kind in our_containers(objects):
        program, args = program_and_args(container, kind)
        command, own_args = resolve(command_of(program), args)
        values = parse(command, own_args)
        where = f"{workload['metadata']['name']}/{container['name']}"
        if program == "retriever-server":
            assert values.get("host") == "0.0.0.0", f"{where}: listen on the pod's address"
            assert _port(container, "grpc") == values["port"], where
            assert _port(container, "grpc-health") == values["health_port"], where
            assert _port(container, "metrics") == values["metrics_port"], where
            if values.get("search_port") is not None:
                assert _port(container, "grpc-search") == values["search_port"], where
            # Probes use the plaintext health-only port, which answers under TLS too.
            assert set(_probe_ports(container)) == {values["health_port"]}, where
            assert all("grpc" in container[k] for k in ("readinessProbe", "livenessProbe"))
            grace = values.get("grace_s", command_default(command, "grace_s"))
            assert pod["terminationGracePeriodSeconds"] > grace, where
        elif program == "decoder-server":
            assert values.get("host") == "0.0.0.0", where
            assert _port(container, "http") == values["port"], where
            for key in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[key]["httpGet"]["path"] == "/health", where
                assert container[key]["httpGet"]["port"] in ("http", values["port"]), where
        exposed = dockerfile_exposed(DOCKERFILES[kind])
        for port in container.get("ports", []):
            if container.get("command") is None:
                assert port["containerPort"] in exposed, f"{where}: {port} not EXPOSEd"


def command_default(command, name: str):
    return next(p.default for p in command.params if p.name == name)


def test_every_environment_variable_is_read_by_something(objects):
    for workload, _, container, kind in our_containers(objects):
        program, args = program_and_args(container, kind)
        command, _ = resolve(command_of(program), args)
        accepted = environment_variables(command)
        for env in container.get("env", []):
            name = env["name"]
            where = f"{workload['metadata']['name']}/{container['name']} sets {name}"
            if name.startswith("OTEL_"):
                assert name in OTEL_VARIABLES, f"{where}: not an OpenTelemetry SDK variable"
            elif name in LIBRARY_VARIABLES:
                continue
            else:
                assert name in accepted, f"{where}, which {program} does not read"


def test_files_named_by_arguments_are_mounted(objects):
    for workload, pod, container, kind in our_containers(objects):
        program, args = program_and_args(container, kind)
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        for arg in args:
            name, _, value = arg.partition("=")
            if name in ("--datastore", "--tls-cert", "--tls-key", "--tls-ca", "--tls-client-ca",
                        "--model", "--tokenizer", "--input", "--out"):
                assert any(value == m or value.startswith(m.rstrip("/") + "/") for m in mounts), \
                    f"{workload['metadata']['name']}: {arg} is not on a mounted volume"


def test_the_datastore_job_writes_where_the_retrievers_read(objects):
    def location(container, flag):
        value = next(a.split("=", 1)[1] for a in container["args"] if a.startswith(flag + "="))
        mount = max((m for m in container["volumeMounts"] if value.startswith(m["mountPath"])),
                    key=lambda m: len(m["mountPath"]))  # fmt: skip
        return mount["name"], value.removeprefix(mount["mountPath"])

    def claim(pod, volume):
        return next(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                    if v["name"] == volume)  # fmt: skip

    written = read = None
    for _, pod, container, kind in our_containers(objects):
        program, args = program_and_args(container, kind)
        if program == "rest" and args[:2] == ["datastore", "build"]:
            volume, path = location(container, "--out")
            written = (claim(pod, volume), path)
        elif program == "retriever-server":
            volume, path = location(container, "--datastore")
            read = (claim(pod, volume), path)
    assert written is not None and written == read


def test_the_topology_names_every_shard_service_and_its_port(objects):
    topology = named(objects, "ConfigMap")["rest-retriever-topology"]["data"]["endpoints"]
    services = named(objects, "Service")
    shards = {d["metadata"]["name"] for d in named(objects, "Deployment").values()
              if d["metadata"]["labels"].get("app.kubernetes.io/component") == "retriever"}
    listed = set()
    for endpoint in topology.split(","):
        host, port = endpoint.rsplit(":", 1)
        assert host in services, f"topology names {host}, which is no Service"
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
        listed.add(host)
    assert listed == shards, "every shard, and only shards, in the topology"
