"""deploy/kubernetes/ validated offline: every built-in resource against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: an unknown field is an error), KEDA's ScaledObject against the schema kept in
deploy/kubernetes/schemas/, and the references between them (selectors, targets, config, probes) checked."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KEDA_SCHEMA = json.loads((MANIFESTS / "schemas" / "keda-scaledobject.json").read_text())
KUBERNETES_VERSION = "1.31.0"  # the oldest release the manifests promise to work on
CHECKPOINT_GRACE_S = 120  # a SIGTERMed GPU worker checkpoints, mirrors and hands its job back within this


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def validate(doc: dict) -> None:
    """Raise when ``doc`` does not fit its schema."""
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize(("file", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_fits_its_schema(file, doc):
    validate(doc)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_validation_catches_mistakes():
    deployment = copy.deepcopy(by_kind("Deployment")["likeness-api"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(by_kind("Deployment")["likeness-api"])
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(by_kind("ScaledObject")["likeness-gpu-worker"])
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")  # the HPA's word, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = copy.deepcopy(by_kind("ScaledObject")["likeness-gpu-worker"])
    del scaled["spec"]["triggers"][0]["metadata"]["listName"]
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_api_probes_service_autoscaler_and_disruption_budget_point_at_the_api():
    api = by_kind("Deployment")["likeness-api"]
    probes = container(api)
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert by_kind("Service")["likeness-api"]["spec"]["selector"].items() <= labels.items()
    assert by_kind("HorizontalPodAutoscaler")["likeness-api"]["spec"]["scaleTargetRef"]["name"] == "likeness-api"
    env = {e["name"]: e["value"] for e in probes["env"]}
    mounts = {m["mountPath"] for m in probes["volumeMounts"]}
    assert "--workers" in probes["command"] and env["PROMETHEUS_MULTIPROC_DIR"] in mounts


def test_gpu_workers_hold_a_gpu_scale_on_the_gpu_queue_to_zero_and_have_time_to_checkpoint():
    from core.config import Settings

    gpu = by_kind("Deployment")["likeness-gpu-worker"]
    spec = gpu["spec"]["template"]["spec"]
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert container(gpu)["command"][-4:] == ["--queues", "gpu", "--concurrency", "1"]
    assert spec["terminationGracePeriodSeconds"] >= CHECKPOINT_GRACE_S
    scaled = by_kind("ScaledObject")["likeness-gpu-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "likeness-gpu-worker"
    assert scaled["minReplicaCount"] == 0
    (trigger,) = scaled["triggers"]
    config = by_kind("ConfigMap")["likeness-config"]["data"]
    broker = config["LIKENESS_BROKER_URL"]
    assert trigger["type"] == "redis"
    assert broker == f"redis://{trigger['metadata']['address']}/{trigger['metadata']['databaseIndex']}"
    # the Redis list kombu keeps the gpu queue in: the prefix (a key prefix too) and the queue's name
    settings = Settings(broker_url=broker, queue_prefix=config.get("LIKENESS_QUEUE_PREFIX", ""))
    assert trigger["metadata"]["listName"] == f"{settings.queue_prefix}{settings.queue('gpu')}"


def test_every_reference_resolves():
    deployments = by_kind("Deployment")
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for name, pdb in by_kind("PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in pod_labels.values()), name
    for name, deployment in deployments.items():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels[name].items()
    config_maps, secrets = set(by_kind("ConfigMap")), set(by_kind("Secret"))
    workloads = [*deployments.values(), *by_kind("Job").values()]
    for workload in workloads:
        for source in container(workload).get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets
    assert container(by_kind("Job")["likeness-migrate"])["command"] == ["likeness", "migrate"]


def test_config_and_secret_name_only_settings_that_exist():
    from core.config import Settings

    known = {f"LIKENESS_{name.upper()}" for name in Settings.model_fields}
    for kind in ("ConfigMap", "Secret"):
        for doc in by_kind(kind).values():
            keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
            assert keys <= known, f"{kind} {doc['metadata']['name']}: unknown settings {sorted(keys - known)}"


def test_images_are_dockerfile_targets():
    from tests.deploy.imagebuild import parse

    _, stages = parse((ROOT / "Dockerfile").read_text())
    for workload in [*by_kind("Deployment").values(), *by_kind("Job").values()]:
        image = container(workload)["image"]
        target = image.split(":")[0].removeprefix("likeness-")
        assert target in stages, f"{workload['metadata']['name']}: {image} is no Dockerfile target"
