"""Offline validation of the Kubernetes manifests in deploy/k8s.

Built-in kinds are validated against the API's OpenAPI schemas shipped by
PyPI's `kubernetes-validate` (strict: unknown fields fail, as a real
`kubectl apply --validate=strict` would). The prometheus-operator CRD has no
schema there, so it is checked structurally, and the pieces that must agree
across files (selectors, ports, metric names, the policy's refusal
settings) are cross-checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate as kv  # noqa: E402 - a dev dependency
import pytest
import yaml

from . import observability as obs

#: The oldest Kubernetes minor we claim to support, and the newest the validator knows.
K8S_VERSIONS = ["1.29.0", kv.latest_version()]
CRD_GROUPS = ("monitoring.coreos.com/",)


def _kustomization() -> dict[str, Any]:
    return obs.load_yaml(obs.K8S_DIR / "kustomization.yaml")


def manifest_files() -> list[Path]:
    """What `kubectl apply -k` applies, plus the optional router."""
    listed = [obs.K8S_DIR / name for name in _kustomization()["resources"]]
    return listed + sorted((obs.K8S_DIR / "optional").glob("*.yaml"))


def _resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in obs.load_yaml_documents(path)]


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in obs.K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for path in manifest_files():
        assert path.is_file(), path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_against_the_api_schemas(version: str) -> None:
    checked = 0
    for path, doc in _resources():
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")
        checked += 1
    assert checked >= 8


def test_deployment_requests_gpus_and_probes_health() -> None:
    deployment = _one("Deployment", "refusal-gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names, probe
    # Startup and readiness wait for the engine; liveness only for the process
    # (the launcher answers /metrics while it reloads vLLM itself).
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["REFUSAL_GATEWAY_HOST"] == "0.0.0.0"
    assert env["REFUSAL_GATEWAY_MODEL"] == "/models/model"


def test_policy_configmap_is_mounted_where_the_server_is_told_to_look() -> None:
    deployment = _one("Deployment", "refusal-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == "refusal-gateway-policy"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["REFUSAL_GATEWAY_POLICY_FILE"] == mount["mountPath"] + "/policy.yaml"
    assert "policy.yaml" in _one("ConfigMap", "refusal-gateway-policy")["data"]


def _policy() -> dict[str, Any]:
    return yaml.safe_load(_one("ConfigMap", "refusal-gateway-policy")["data"]["policy.yaml"])


def test_policy_profiles_are_valid_refusal_settings() -> None:
    """Each profile's values pass the engine's own parser (the one requests go through)."""
    from refusal_plugins.params import BIAS_FIELD, THRESHOLD_FIELD, parse_refusal_params

    policy = _policy()
    profiles = policy["profiles"]
    assert {"strict", "balanced", "permissive"} <= set(profiles)
    assert policy["default_profile"] in profiles
    for name, profile in profiles.items():
        settings = {f: profile[f] for f in (BIAS_FIELD, THRESHOLD_FIELD) if profile.get(f)}
        parse_refusal_params(settings)  # raises RefusalParamError naming the bad field
        assert set(profile) <= {BIAS_FIELD, THRESHOLD_FIELD, "refusal_temperature",
                                "request_rules"}, name


def test_policy_loads_with_the_servers_policy_model() -> None:
    """The ConfigMap's policy.yaml is a file the server accepts."""
    from refusal_gateway.policy import Policy, PolicyFile

    policy = Policy(PolicyFile.model_validate(_policy()))
    assert policy.profile_names
    # The strict profile keeps the client from setting the decision's context.
    assert policy.rules("strict").model_dump() == {
        "system_messages": "reject", "assistant_prefill": "reject", "custom_roles": "reject",
        "raw_prompts": "reject"}


def test_service_selects_the_deployment_pods() -> None:
    service = _one("Service", "refusal-gateway")
    labels = _one("Deployment", "refusal-gateway")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_servicemonitor_scrapes_the_service_under_the_rules_job_name() -> None:
    monitor = _one("ServiceMonitor", "refusal-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one("Service", "refusal-gateway")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == obs.JOB
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_hpa_scales_the_deployment_on_the_adapters_queue_metric() -> None:
    hpa = _one("HorizontalPodAutoscaler", "refusal-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "refusal-gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    adapter = obs.load_yaml(obs.K8S_DIR / "helm" / "prometheus-adapter-values.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]


def test_optional_router_discovers_the_server_pods() -> None:
    router = _one("Deployment", "refusal-gateway-router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    selector = [a for a in container["args"] if a.startswith("--k8s-label-selector=")]
    (value,) = [s.partition("=")[2] for s in selector]
    wanted = dict(pair.split("=", 1) for pair in value.split(","))
    labels = _one("Deployment", "refusal-gateway")["spec"]["template"]["metadata"]["labels"]
    assert wanted.items() <= labels.items()
    namespace = [a for a in container["args"] if a.startswith("--k8s-namespace=")]
    assert namespace == [f"--k8s-namespace={_kustomization()['namespace']}"]


def test_images_are_pinned() -> None:
    for path, doc in _resources():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            image = container["image"]
            if image == "refusal-gateway":  # set by kustomization.yaml `images`
                continue
            assert ":" in image and not image.endswith(":latest"), f"{path.name}: {image}"
    (image,) = _kustomization()["images"]
    assert image["name"] == "refusal-gateway" and image["newTag"]


def _probe_budget_s(probe: dict[str, Any]) -> int:
    """How long a probe tolerates failures before it acts."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_rollouts_and_the_hpa_do_not_fight() -> None:
    deployment = _one("Deployment", "refusal-gateway")
    # No replicas: every `kubectl apply` would reset the count the HPA chose.
    assert "replicas" not in deployment["spec"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    startup_s = _probe_budget_s(container["startupProbe"])
    assert startup_s >= 900
    # A rollout may wait for a full model load before it counts as stuck.
    assert deployment["spec"]["progressDeadlineSeconds"] > startup_s
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_pods_drain_and_spread_and_a_budget_limits_disruptions() -> None:
    deployment = _one("Deployment", "refusal-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) > 0
    env = {e["name"]: e["value"] for e in container["env"]}
    drain_s = float(env["REFUSAL_GATEWAY_SHUTDOWN_GRACE_S"])
    from refusal_gateway.launcher import KILL_MARGIN_S

    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s + KILL_MARGIN_S
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    keys = set()
    for spread in pod["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
        keys.add(spread["topologyKey"])
    assert "kubernetes.io/hostname" in keys
    pdb = _one("PodDisruptionBudget", "refusal-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = _one("HorizontalPodAutoscaler", "refusal-gateway")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_liveness_tolerates_no_answer_only_briefly() -> None:
    """Liveness acts on a dead or hung process, not on a model load (the standby answers it)."""
    (container,) = _one("Deployment", "refusal-gateway")["spec"]["template"]["spec"]["containers"]
    liveness = container["livenessProbe"]
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"]
    assert _probe_budget_s(liveness) <= 120


def test_model_claim_never_binds_a_dynamically_provisioned_volume() -> None:
    claim = _one("PersistentVolumeClaim", "refusal-gateway-model")
    assert claim["spec"]["storageClassName"] == ""
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_servicemonitor_copies_vllms_model_name_into_model_like_the_compose_config() -> None:
    (endpoint,) = _one("ServiceMonitor", "refusal-gateway")["spec"]["endpoints"]
    (relabel,) = endpoint["metricRelabelings"]
    (compose,) = obs.scrape_job()["metric_relabel_configs"]
    assert relabel["sourceLabels"] == compose["source_labels"]
    assert relabel["regex"] == compose["regex"]
    assert relabel["targetLabel"] == compose["target_label"]
    assert relabel["replacement"] == compose["replacement"]
