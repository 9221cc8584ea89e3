"""deploy/k8s: every manifest of the kustomization validated offline against the Kubernetes schemas (strict), and
the wiring checked: references resolve, Services select pods, the app containers' arguments parse with the real
CLI, security settings, one GPU per worker."""
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
DOCS = [d for f in KUSTOMIZATION["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]
BY_KIND = {}
for _d in DOCS:
    BY_KIND.setdefault(_d["kind"], {})[_d["metadata"]["name"]] = _d


def pod_specs():
    """(owner name, pod template) of every workload."""
    for kind in ("Job", "Deployment", "StatefulSet"):
        for name, d in BY_KIND.get(kind, {}).items():
            yield f"{kind}/{name}", d["spec"]["template"]


def containers(spec):
    return spec["spec"].get("initContainers", []) + spec["spec"]["containers"]


@pytest.mark.parametrize("doc", DOCS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in DOCS])
def test_every_manifest_validates_strictly(doc):
    kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises on any schema violation or unknown field


def test_kustomization_lists_every_manifest_and_the_image():
    assert sorted(KUSTOMIZATION["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    assert KUSTOMIZATION["namespace"] == "debias-study"
    image = KUSTOMIZATION["images"][0]["name"]
    app = [c for _, s in pod_specs() for c in containers(s) if c["image"] != "postgres:16"]
    assert app and all(c["image"] == image for c in app)


def test_references_resolve():
    secret_keys = {n: set(d.get("stringData", {})) | set(d.get("data", {})) for n, d in BY_KIND["Secret"].items()}
    config_keys = {n: set(d["data"]) for n, d in BY_KIND["ConfigMap"].items()}
    claims = set(BY_KIND["PersistentVolumeClaim"])
    for owner, spec in pod_specs():
        for c in containers(spec):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secret_keys[r["name"]], (owner, r)
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in config_keys[r["name"]], (owner, r)
            names = {v["name"] for v in spec["spec"].get("volumes", [])}
            templates = {t["metadata"]["name"] for t in BY_KIND.get("StatefulSet", {}).get(owner.split("/")[1], {})
                         .get("spec", {}).get("volumeClaimTemplates", [])} if owner.startswith("StatefulSet") else set()
            for m in c.get("volumeMounts", []):
                assert m["name"] in names | templates, (owner, m)
        for v in spec["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (owner, v)
            if "configMap" in v:
                assert {i["key"] for i in v["configMap"]["items"]} <= config_keys[v["configMap"]["name"]]
    for name, svc in BY_KIND["Service"].items():  # a Service selects a workload's pods, on a port they name
        pods = [s for _, s in pod_specs() if svc["spec"]["selector"].items() <= s["metadata"]["labels"].items()]
        assert len(pods) == 1, name
        ports = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"  # nothing exposed outside the cluster


def test_storage_url_points_at_the_in_cluster_database():
    secret = BY_KIND["Secret"]["debias-db"]["stringData"]
    url = urlsplit(secret["url"])
    pg = BY_KIND["StatefulSet"]["postgres"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in pg["env"]}
    assert url.hostname in BY_KIND["Service"] and url.port == 5432
    assert (url.username, url.path[1:]) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    pg_password = next(e["valueFrom"]["secretKeyRef"] for e in pg["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert pg_password == {"name": "debias-db", "key": "password"}  # the key every app pod reads as PGPASSWORD
    claim = BY_KIND["StatefulSet"]["postgres"]["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # the database persists


def test_app_arguments_parse_with_the_real_cli():
    from study.cli import get_args_parser
    from study.report import get_args_parser as get_report_parser
    report_parser = get_report_parser()
    config = BY_KIND["ConfigMap"]["experiment"]["data"]
    parser = get_args_parser()
    seen = set()
    for owner, spec in pod_specs():
        for c in containers(spec):
            if c["image"] == "postgres:16":
                continue
            args = c.get("args") or shlex.split(c["command"][-1].split("python -m study ", 1)[1].split(" >")[0])
            args = [a.replace("$(EXPERIMENT)", config["EXPERIMENT"]).replace("$EXPERIMENT", config["EXPERIMENT"])
                    for a in args]
            if args[0] == "report":  # python -m study report ... is python -m study.report ...
                parsed = report_parser.parse_args(args[1:])
                parsed.command = "report"
            else:
                parsed = parser.parse_args(args)
            seen.add(parsed.command)
            if parsed.command in ("init", "worker", "status", "report"):
                assert config["EXPERIMENT"] in args
            assert "OPTUNA_STORAGE" in {e["name"] for e in c["env"]}, owner  # every app container: the storage
    assert seen == {"init", "worker", "status", "dashboard", "report"}
    # the experiment settings are a valid experiment (without touching the data)
    from study.experiment import Experiment
    settings = tomllib.loads(config["experiment.toml"])
    Experiment.of(name=config["EXPERIMENT"], **settings)


def test_workers_one_gpu_each_non_root_and_read_only_data():
    job = BY_KIND["Job"]["workers"]["spec"]
    assert job["parallelism"] >= 1 and "completions" not in job  # a work queue: done when the workers are
    (worker,) = job["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and worker["args"][-2:] == ["--device", "cuda"]
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] >= 60  # time to fail and re-queue the trial
    rules = job["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [3]}} in rules
    disruption = [{"type": "DisruptionTarget", "status": "True"}]
    assert any(r["action"] == "Ignore" and r["onPodConditions"] == disruption for r in rules)
    assert BY_KIND["Job"]["report"]["spec"]["suspend"] is True
    assert BY_KIND["PersistentVolumeClaim"]["data"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    for owner, spec in pod_specs():
        assert spec["spec"]["securityContext"]["runAsNonRoot"] is True, owner
        for c in containers(spec):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, owner
            for m in c.get("volumeMounts", []):
                if m["name"] in ("data", "weights", "config"):
                    assert m.get("readOnly") is True, (owner, m)


def test_network_policies_admit_only_the_service_to_postgres_and_nobody_to_the_dashboard():
    labels = {owner: spec["metadata"]["labels"]["app.kubernetes.io/name"] for owner, spec in pod_specs()}
    app = {labels[o] for o, spec in pod_specs() if any("OPTUNA_STORAGE" in {e["name"] for e in c.get("env", [])}
                                                       for c in containers(spec))}
    pg, dash = BY_KIND["NetworkPolicy"]["postgres"]["spec"], BY_KIND["NetworkPolicy"]["dashboard"]["spec"]
    assert pg["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "postgres"} and pg["policyTypes"] == [
        "Ingress"]
    (rule,) = pg["ingress"]
    (expr,) = rule["from"][0]["podSelector"]["matchExpressions"]
    assert expr["operator"] == "In" and set(expr["values"]) == app, (expr, app)  # every client, nothing more
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    assert dash["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "dashboard"} and dash["ingress"] == []


def test_the_secret_placeholder_is_refused_and_the_password_stays_out_of_the_url(monkeypatch):
    from conftest import study_main
    secret = BY_KIND["Secret"]["debias-db"]["stringData"]
    assert urlsplit(secret["url"]).password is None
    for owner, spec in pod_specs():
        for c in containers(spec):
            names = {e["name"] for e in c.get("env", [])}
            assert "OPTUNA_STORAGE" not in names or "PGPASSWORD" in names, owner
    monkeypatch.setenv("PGPASSWORD", secret["password"])
    p = study_main("list", "--storage", secret["url"].replace("@postgres:", "@127.0.0.1:"))
    assert p.returncode == 2 and "the password is the placeholder 'CHANGE-ME'" in p.stderr, p.stderr
