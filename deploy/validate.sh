#!/usr/bin/env bash
# Static checks of the deployment files, without a cluster or Docker: the Kubernetes manifests parse and hold
# what production needs (probes, resources, a locked-down securityContext, known configuration variables), the
# Dockerfile has its stages, the Prometheus files parse, and the shell scripts pass `bash -n` and shellcheck.
# promtool and shellcheck are used when installed and skipped otherwise.
#
# Usage: deploy/validate.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=0
fail() {
    printf 'validate: FAIL: %s\n' "$*" >&2
    failed=1
}
ok() { printf 'validate: ok: %s\n' "$*"; }

# --- shell scripts ---------------------------------------------------------------------------------------------
scripts=(deploy/*.sh .ci/run)
for script in "${scripts[@]}"; do
    bash -n "$script" || fail "$script: syntax"
done
ok "bash -n: ${scripts[*]}"
if command -v shellcheck >/dev/null 2>&1; then
    if shellcheck -x "${scripts[@]}"; then ok "shellcheck"; else fail "shellcheck"; fi
else
    echo "validate: skip: shellcheck not installed (apt-get install shellcheck)"
fi

# --- YAML: Kubernetes, Prometheus, Dockerfile ------------------------------------------------------------------
if ! python3 -c 'import yaml' 2>/dev/null; then
    echo "validate: installing PyYAML for python3"
    python3 -m pip install --quiet --user pyyaml ||
        {
            echo "validate: could not install PyYAML; install python3-yaml with apt-get" >&2
            exit 1
        }
fi

python3 - <<'PY' || failed=1
import os
import re
import sys

import yaml

errors = []
_reported = 0


def fail(msg):
    errors.append(msg)


def ok(msg):
    """Reports a group of checks as passed, unless one of them failed since the previous report."""
    global _reported
    if len(errors) == _reported:
        print(f"validate: ok: {msg}")
    _reported = len(errors)


def load_all(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: {e}")
        return []


# Configuration variables the code reads: every key in the ConfigMap and the Secret must be one of them.
with open("shared/src/config.rs") as f:
    known_vars = set(re.findall(r'"(LEADFLOW_[A-Z0-9_]+)"', f.read()))
if not known_vars:
    fail("shared/src/config.rs: no LEADFLOW_* variables found")

# ---- Kubernetes
k8s = "k8s"
docs = {}
for name in sorted(os.listdir(k8s)):
    if name.endswith((".yaml", ".yml")):
        docs[name] = load_all(os.path.join(k8s, name))
        for d in docs[name]:
            if name != "kustomization.yaml" and not (d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name")):
                fail(f"k8s/{name}: a document lacks apiVersion, kind or metadata.name")
ok(f"k8s: {len(docs)} files parse")

kustomization = (docs.get("kustomization.yaml") or [{}])[0]
listed = kustomization.get("resources", [])
for r in listed:
    if not os.path.exists(os.path.join(k8s, r)):
        fail(f"k8s/kustomization.yaml lists {r}, which does not exist")
if "secret.example.yaml" in listed:
    fail("k8s/kustomization.yaml must not deploy secret.example.yaml")
for name in docs:
    if name not in ("kustomization.yaml", "secret.example.yaml") and name not in listed:
        fail(f"k8s/{name} is not listed in kustomization.yaml")
if kustomization.get("namespace") != "leadflow":
    fail("k8s/kustomization.yaml: namespace should be leadflow")

objects = [(name, d) for name, ds in docs.items() if name != "kustomization.yaml" for d in ds]
by_kind = {}
for name, d in objects:
    by_kind.setdefault(d["kind"], []).append((name, d))

configmaps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
secrets = {d["metadata"]["name"]: d for _, d in by_kind.get("Secret", [])}
secret_keys = {"LEADFLOW_DATABASE_URL", "LEADFLOW_AMQP_URL", "LEADFLOW_SMTP_URL", "LEADFLOW_NOTIFY_SECRET"}

for cm_name, cm in configmaps.items():
    data = cm.get("data", {})
    for key, value in data.items():
        if key not in known_vars:
            fail(f"ConfigMap {cm_name}: {key} is not a variable shared/src/config.rs reads")
        if not isinstance(value, str):
            fail(f"ConfigMap {cm_name}: {key} must be a string (quote it)")
        if key in secret_keys:
            fail(f"ConfigMap {cm_name}: {key} carries credentials and belongs in the Secret")
    if data.get("LEADFLOW_AMQP_QUEUE_TYPE") != "quorum":
        fail(f"ConfigMap {cm_name}: LEADFLOW_AMQP_QUEUE_TYPE should be quorum in a cluster")
for s_name, s in secrets.items():
    keys = set(s.get("stringData", {})) | set(s.get("data", {}))
    if keys != secret_keys:
        fail(f"Secret {s_name}: expected exactly {sorted(secret_keys)}, got {sorted(keys)}")
    for key in keys - known_vars:
        fail(f"Secret {s_name}: {key} is not a variable shared/src/config.rs reads")
ok("ConfigMap and Secret keys are known variables")


def check_pod(where, spec, containers_expect_args):
    """Checks a pod spec; containers_expect_args: the args the (single) container must have."""
    psc = spec.get("securityContext", {})
    containers = spec.get("containers", [])
    if len(containers) != 1:
        fail(f"{where}: expected one container")
        return
    c = containers[0]
    if c.get("image") != "leadflow":
        fail(f"{where}: image should be `leadflow` (kustomization.yaml sets name and tag)")
    if c.get("args") != containers_expect_args:
        fail(f"{where}: args {c.get('args')} != {containers_expect_args}")
    csc = c.get("securityContext", {})
    if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        fail(f"{where}: runAsNonRoot")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(f"{where}: readOnlyRootFilesystem")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(f"{where}: allowPrivilegeEscalation should be false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        fail(f"{where}: capabilities must drop ALL")
    res = c.get("resources", {})
    if not (res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        fail(f"{where}: resources need cpu and memory requests and a memory limit")
    refs = c.get("envFrom", [])
    cms = [r["configMapRef"]["name"] for r in refs if "configMapRef" in r]
    scs = [r["secretRef"]["name"] for r in refs if "secretRef" in r]
    if not cms or any(n not in configmaps for n in cms):
        fail(f"{where}: envFrom must reference the ConfigMap ({sorted(configmaps)}), got {cms}")
    if not scs or any(n not in secrets for n in scs):
        fail(f"{where}: envFrom must reference the Secret from secret.example.yaml ({sorted(secrets)}), got {scs}")
    return c


deployments = by_kind.get("Deployment", [])
expected = {"ingest", "scheduler", "renderer", "sender", "api"}
seen = set()
for name, d in deployments:
    dname = d["metadata"]["name"]
    where = f"k8s/{name} Deployment {dname}"
    spec = d.get("spec", {})
    tmpl = spec.get("template", {})
    labels = tmpl.get("metadata", {}).get("labels", {})
    component = labels.get("app.kubernetes.io/component")
    seen.add(component)
    selector = spec.get("selector", {}).get("matchLabels", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        fail(f"{where}: selector {selector} does not match the pod labels")
    pod = tmpl.get("spec", {})
    if pod.get("terminationGracePeriodSeconds") != 60:
        fail(f"{where}: terminationGracePeriodSeconds should be 60")
    c = check_pod(where, pod, ["run", component])
    if c is None:
        continue
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path:
            fail(f"{where}: {probe} should GET {path}")
        port = get.get("port")
        ports = {p.get("name") for p in c.get("ports", [])} | {p.get("containerPort") for p in c.get("ports", [])}
        if port not in ports:
            fail(f"{where}: {probe} port {port} is not a container port")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if env.get("LEADFLOW_HTTP_ADDR") != "0.0.0.0:8080":
        fail(f"{where}: LEADFLOW_HTTP_ADDR should be 0.0.0.0:8080")
    ann = tmpl.get("metadata", {}).get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "8080":
        fail(f"{where}: prometheus.io/scrape and prometheus.io/port annotations")
    replicas = spec.get("replicas", 1)
    if component in ("ingest", "scheduler") and replicas < 2:
        fail(f"{where}: expected at least 2 replicas")
if seen != expected:
    fail(f"k8s: Deployments for {sorted(seen)}, expected {sorted(expected)}")
ok(f"k8s: {len(deployments)} Deployments have probes, resources, securityContext and the right args")

services = by_kind.get("Service", [])
if sorted(d["metadata"]["name"] for _, d in services) != ["leadflow-api", "leadflow-ingest"]:
    fail(f"k8s: only ingest and api should have a Service, found {[d['metadata']['name'] for _, d in services]}")
for name, s in services:
    sel = s["spec"].get("selector", {})
    targets = [d for _, d in deployments
               if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    if [t["metadata"]["name"] for t in targets] != [s["metadata"]["name"]]:
        fail(f"k8s/{name}: selector {sel} should select exactly the {s['metadata']['name']} pods")
ok("k8s: each Service selects the pods of its own Deployment")

jobs = by_kind.get("Job", [])
if len(jobs) != 1:
    fail("k8s: expected one migration Job")
for name, j in jobs:
    pod = j["spec"]["template"]["spec"]
    check_pod(f"k8s/{name} Job", pod, ["migrate"])
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        fail(f"k8s/{name}: restartPolicy must be Never or OnFailure")
ok("k8s: migration Job")

# ---- Dockerfile
with open("deploy/Dockerfile") as f:
    dockerfile = f.read()
stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.M | re.I)
images = [s[0] for s in stages]
names = [s[1].lower() for s in stages if s[1]]
if not images or images[0] != "rust:1-bookworm" or "builder" not in names:
    fail(f"deploy/Dockerfile: first stage should be `rust:1-bookworm AS builder`, got {stages}")
if not images or images[-1] != "debian:bookworm-slim":
    fail(f"deploy/Dockerfile: the final stage should be debian:bookworm-slim, got {images[-1:]}")
for ref in re.findall(r"--from=(\S+)", dockerfile):
    if ref.lower() not in names:
        fail(f"deploy/Dockerfile: COPY --from={ref} names no stage")
for needle in (
    "cargo build --release",
    "--bin leadflow",
    "ca-certificates",
    "USER 10001",
    'ENTRYPOINT ["leadflow"]',
    'CMD ["run", "all"]',
    "EXPOSE 8080",
    "LEADFLOW_HTTP_ADDR=0.0.0.0:8080",
    "LEADFLOW_LOG_FORMAT=json",
):
    if needle not in dockerfile:
        fail(f"deploy/Dockerfile: missing {needle!r}")
with open(".dockerignore") as f:
    ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
for entry in ("target", ".git", "outbox"):
    if entry not in ignored:
        fail(f".dockerignore: missing {entry}")
ok(f"deploy/Dockerfile: stages {names}, runtime {images[-1:]}")

# ---- Prometheus
prom = (load_all("deploy/prometheus/prometheus.yml") or [{}])[0]
for rf in prom.get("rule_files", []):
    if not os.path.exists(os.path.join("deploy/prometheus", rf)):
        fail(f"deploy/prometheus/prometheus.yml: rule file {rf} does not exist")
jobs = [sc.get("job_name") for sc in prom.get("scrape_configs", [])]
if "leadflow" not in jobs:
    fail("deploy/prometheus/prometheus.yml: no `leadflow` scrape job")
alerts = (load_all("deploy/prometheus/alerts.yml") or [{}])[0]
rules = [r for g in alerts.get("groups", []) for r in g.get("rules", [])]
for r in rules:
    if not (r.get("alert") and r.get("expr") and r.get("labels", {}).get("severity")):
        fail(f"deploy/prometheus/alerts.yml: rule {r.get('alert')} needs alert, expr and a severity label")
exprs = " ".join(r.get("expr", "") for r in rules)
for metric in ("leadflow_dead_lettered_total", 'leadflow_sender_emails_total{outcome="failed"}',
               "leadflow_scheduler_uncertain_total", "up{"):
    if metric not in exprs:
        fail(f"deploy/prometheus/alerts.yml: no rule on {metric}")
ok(f"deploy/prometheus: {len(rules)} alert rules")

for e in errors:
    print(f"validate: FAIL: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

if command -v promtool >/dev/null 2>&1; then
    if promtool check config deploy/prometheus/prometheus.yml; then ok "promtool"; else fail "promtool"; fi
else
    echo "validate: skip: promtool not installed"
fi

if [ "$failed" -ne 0 ]; then
    echo "validate: failed" >&2
    exit 1
fi
echo "validate: all checks passed"
