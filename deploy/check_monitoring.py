"""Validates the Prometheus Operator objects in rendered kustomize output.

kubernetes-validate bundles only the built-in Kubernetes schemas, so it skips
ServiceMonitor and PrometheusRule. This fills that gap, offline:
  * each object against the prometheus-operator CRD models (cloudcoil), with
    unknown fields rejected (the models ignore extras, so a round trip shows
    them);
  * every rule expression parsed as PromQL (promql-parser);
  * every ServiceMonitor selecting at least one Service of the same output in
    its namespace, each of which has the named endpoint port.

Usage: python check_monitoring.py RENDERED.yaml...   (run by .ci/deploy-check)
"""

import sys

import promql_parser
import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1

API_VERSION = "monitoring.coreos.com/v1"


def unknown_fields(given, known, path=""):
    """Paths present in `given` but dropped by the model (unknown fields)."""
    if isinstance(given, dict) and isinstance(known, dict):
        out = []
        for key, value in given.items():
            sub = f"{path}.{key}"
            out += [sub] if key not in known else unknown_fields(value, known[key], sub)
        return out
    if isinstance(given, list) and isinstance(known, list):
        return [p for i, (a, b) in enumerate(zip(given, known)) for p in unknown_fields(a, b, f"{path}[{i}]")]
    return []


def check_object(doc, services):
    kind, name = doc["kind"], doc["metadata"]["name"]
    model = getattr(v1, kind, None)
    if model is None:
        return [f"{kind}/{name}: no model for {API_VERSION} {kind}"]
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as err:
        return [f"{kind}/{name}: {err}"]
    known = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    errors = [f"{kind}/{name}: unknown field {p}" for p in unknown_fields(doc, known)]

    if kind == "PrometheusRule":
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                label = rule.get("alert") or rule.get("record")
                try:
                    promql_parser.parse(str(rule["expr"]))
                except ValueError as err:
                    errors.append(f"{kind}/{name}: rule {label}: bad PromQL: {err}")
    elif kind == "ServiceMonitor":
        namespace = doc["metadata"].get("namespace")
        wanted = doc["spec"]["selector"].get("matchLabels", {})
        matched = [
            s for s in services
            if s["metadata"].get("namespace") == namespace
            and wanted.items() <= s["metadata"].get("labels", {}).items()
        ]
        if not matched:
            errors.append(f"{kind}/{name}: selector {wanted} matches no Service")
        for svc in matched:
            ports = {p.get("name") for p in svc["spec"].get("ports", [])}
            for endpoint in doc["spec"]["endpoints"]:
                if endpoint.get("port") not in ports:
                    errors.append(
                        f"{kind}/{name}: Service {svc['metadata']['name']} has no port named {endpoint.get('port')!r}"
                    )
    return errors


def main(paths):
    errors, checked = [], 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        services = [d for d in docs if d.get("kind") == "Service" and d.get("apiVersion") == "v1"]
        for doc in docs:
            if doc.get("apiVersion") == API_VERSION:
                checked += 1
                errors += [f"{path}: {e}" for e in check_object(doc, services)]
    for error in errors:
        print(f"ERROR {error}")
    print(f"{checked} Prometheus Operator object(s) checked, {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
