"""deploy/kubernetes: every manifest is valid against the Kubernetes API schemas (kubernetes-validate,
offline, strict), and the pieces point at each other: labels, ports, probes, GPU, RBAC."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DIR = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
MANIFESTS = sorted(DIR.glob("*.yaml"))


def resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str) -> dict:
    (found,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def container(deployment: dict, name: str) -> dict:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def flag(words: list[str], name: str) -> str:
    """--name=value or --name value."""
    for i, w in enumerate(words):
        if w.startswith(f"{name}="):
            return w.split("=", 1)[1]
        if w == name:
            return words[i + 1]
    raise KeyError(name)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_replica_pod_wiring() -> None:
    replicas = one("Deployment", "nanovllm")
    pod = replicas["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert replicas["spec"]["selector"]["matchLabels"].items() <= labels.items()
    worker, scheduler = container(replicas, "worker"), container(replicas, "scheduler")
    w, s = worker["command"], scheduler["command"]
    # The GPU on the worker only; the scheduler finds its worker inside the pod.
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in scheduler.get("resources", {}).get("limits", {})
    assert flag(s, "--workers") == f"127.0.0.1:{flag(w, '--port')}"
    # gRPC health probes on each one's own port (grpc.health.v1, which both serve).
    for c, words in ((worker, w), (scheduler, s)):
        assert c["startupProbe"]["grpc"]["port"] == int(flag(words, "--port"))
        assert flag(words, "--host") == "0.0.0.0"  # the kubelet probes the pod's IP
    assert scheduler["readinessProbe"]["grpc"]["port"] == int(flag(s, "--port"))
    assert worker["livenessProbe"]["grpc"]["port"] == int(flag(w, "--port"))
    ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    assert ports == {"grpc": int(flag(s, "--port")), "metrics": int(flag(s, "--metrics-port"))}
    # A drain (--shutdown-timeout, 30 s by default) fits in the grace period.
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim)
    # The headless Service and the PodDisruptionBudget select these pods.
    service = one("Service", "nanovllm")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= labels.items()
    pdb = one("PodDisruptionBudget", "nanovllm")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gateway_discovers_the_replicas() -> None:
    replicas = one("Deployment", "nanovllm")
    pod_labels = replicas["spec"]["template"]["metadata"]["labels"]
    grpc_port = container(replicas, "scheduler")["ports"][0]["containerPort"]
    gateway = one("Deployment", "nanovllm-gateway")
    g = container(gateway, "gateway")
    args = g["args"]
    assert "--service-discovery" in args and flag(args, "--policy") == "cache_aware"
    key, value = flag(args, "--selector").split("=")
    assert pod_labels[key] == value
    assert gateway["spec"]["template"]["metadata"]["labels"].get(key) != value  # it does not discover itself
    assert int(flag(args, "--service-discovery-port")) == grpc_port
    # It may watch pods in its namespace: the Role, bound to the account it runs as.
    account = gateway["spec"]["template"]["spec"]["serviceAccountName"]
    assert one("ServiceAccount", account)
    binding = one("RoleBinding", account)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    (rule,) = one("Role", binding["roleRef"]["name"])["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    # Its Service publishes the OpenAI HTTP port.
    service = one("Service", "nanovllm-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert {p["name"]: p["containerPort"] for p in g["ports"]}["http"] == int(flag(args, "--port"))


def test_gateway_args_parse_with_smgs_own_parser() -> None:
    launch = pytest.importorskip("smg.launch_router", reason="needs the smg gateway (pip install smg)")
    g = container(one("Deployment", "nanovllm-gateway"), "gateway")
    assert g["command"][-1] == "smg.launch_router"
    env = {e["name"]: "default" for e in g["env"]}  # the kubelet expands $(NAME) from the env
    args = [a.replace(f"$({n})", v) for a in g["args"] for n, v in env.items()]
    parsed = launch.parse_router_args(args)
    assert parsed.service_discovery and parsed.selector == {"app.kubernetes.io/name": "nanovllm"}
    assert (parsed.service_discovery_namespace, parsed.service_discovery_port) == ("default", 50051)


def test_replica_commands_parse_with_the_services_own_flags() -> None:
    from scheduler_svc.server import parser as scheduler_flags
    from worker_svc.server import parser as worker_flags

    replicas = one("Deployment", "nanovllm")
    w, s = container(replicas, "worker")["command"], container(replicas, "scheduler")["command"]
    assert w[:3] == ["python", "-m", "worker_svc"] and s[:3] == ["python", "-m", "scheduler_svc"]
    worker, scheduler = worker_flags().parse_args(w[3:]), scheduler_flags().parse_args(s[3:])
    assert (worker.model, worker.host, worker.port) == ("/model", "0.0.0.0", 50061)
    assert (scheduler.model, scheduler.port, scheduler.metrics_port) == ("/model", 50051, 8000)
    assert scheduler.workers == ("127.0.0.1:50061",)
