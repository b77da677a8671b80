#!/usr/bin/env python3
"""Lints the Helm chart and validates its rendered manifests against the Kubernetes schemas,
offline: Helm's own library (helm-sdkpy) installs the chart into a fake API server on loopback
that records every object Helm creates; kubernetes-validate then checks each one. With
KVFLEET_OPERATOR_BIN set, the objects the operator applies for each examples/*.yaml cluster
(`kvfleet-operator render`) are validated too.

Usage: chart_check.py [chart-dir]   (exit 1 on any lint error or invalid manifest)
"""
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import helm_sdkpy
import kubernetes_validate
import yaml

KUBE_VERSION = "1.33.0"
# Discovery: group/version -> [(plural, kind, namespaced)]
RESOURCES = {
    "v1": [("namespaces", "Namespace", False), ("secrets", "Secret", True), ("configmaps", "ConfigMap", True),
           ("services", "Service", True), ("serviceaccounts", "ServiceAccount", True), ("pods", "Pod", True)],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False), ("clusterrolebindings", "ClusterRoleBinding", False),
                                     ("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
    "apiextensions.k8s.io/v1": [("customresourcedefinitions", "CustomResourceDefinition", False)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "coordination.k8s.io/v1": [("leases", "Lease", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
    "kvfleet.io/v1alpha1": [("keyvalueclusters", "KeyValueCluster", True)],
}
created = []
store = {}


class FakeApiServer(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def not_found(self):
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    def body(self):
        length = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(length)
        if "protobuf" in self.headers.get("Content-Type", ""):
            # Helm's release record (a Secret) goes as protobuf; it is Helm's bookkeeping, not a
            # chart manifest: answer with a stub.
            return {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "helm-release"}, "type": "helm.sh/release.v1"}
        return json.loads(data or b"{}")

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/version":
            major, minor, _ = KUBE_VERSION.split(".")
            return self.reply(200, {"major": major, "minor": minor, "gitVersion": "v" + KUBE_VERSION})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                       "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                      for gv in RESOURCES if "/" in gv]
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        for gv, resources in RESOURCES.items():
            prefix = "/api/v1" if gv == "v1" else "/apis/" + gv
            if path == prefix:
                return self.reply(200, {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                    {"name": plural, "singularName": "", "namespaced": namespaced, "kind": kind,
                     "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                    for plural, kind, namespaced in resources]})
        if path in store:
            return self.reply(200, store[path])
        if path.rsplit("/", 1)[-1] in {plural for rs in RESOURCES.values() for plural, _, _ in rs}:
            return self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []})
        return self.not_found()

    def do_POST(self):
        obj = self.body()
        obj.setdefault("metadata", {})["resourceVersion"] = "1"
        if obj.get("kind") == "CustomResourceDefinition":
            obj["status"] = {"conditions": [{"type": "Established", "status": "True"}, {"type": "NamesAccepted", "status": "True"}]}
        store[self.path.split("?")[0].rstrip("/") + "/" + obj["metadata"].get("name", "")] = obj
        if obj.get("kind") != "Secret" or "helm.sh/release" not in obj.get("type", ""):
            created.append(obj)
        self.reply(201, obj)

    def do_PUT(self):
        obj = self.body()
        store[self.path.split("?")[0]] = obj
        self.reply(200, obj)

    def do_PATCH(self):
        path = self.path.split("?")[0]
        self.reply(200, store.get(path, self.body()))


def install(chart, values, server_url):
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "kvfleet-system"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(kubeconfig, f)
    config = helm_sdkpy.Configuration(namespace="kvfleet-system", kubeconfig=f.name)
    asyncio.run(helm_sdkpy.Install(config).run("kvfleet", chart, values=values, wait=False, timeout=60))


def main():
    chart = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "charts", "kvfleet")
    failures = []
    lint = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace="default")).run(chart))
    for message in lint.get("Messages") or []:
        if message["Severity"] >= 2:
            failures.append(f"helm lint: {message['Path']}: severity {message['Severity']}")
    if lint.get("Errors"):
        failures.append(f"helm lint: {len(lint['Errors'])} errors")
    print(f"helm lint: {len(lint.get('Messages') or [])} messages, {len(lint.get('Errors') or [])} errors")

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    # Default values, and every optional part switched on.
    for values in ({}, {"serviceMonitor": {"enabled": True}, "networkPolicy": {"enabled": True},
                        "replicaCount": 2, "watchNamespace": "team-a"}):
        created.clear()
        store.clear()
        install(chart, values, url)
        kinds = sorted(o["kind"] for o in created)
        print(f"rendered with {json.dumps(values)}: {', '.join(kinds)}")
        for obj in created:
            if obj["kind"] in ("ServiceMonitor", "CustomResourceDefinition") or obj["apiVersion"].startswith("kvfleet.io"):
                continue  # not in the Kubernetes schemas (CRD-defined or third-party)
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                failures.append(f"{obj['kind']} {obj['metadata'].get('name')}: {error.message} at {list(error.path)}")
        expected = {"CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Secret", "Service",
                    "ServiceAccount"}
        if values.get("watchNamespace"):
            # Rights in the watched namespace only: no cluster-wide role.
            roles = [o for o in created if o["kind"] == "Role"]
            if any(o["kind"].startswith("Cluster") for o in created):
                failures.append(f"watchNamespace {values['watchNamespace']} still renders cluster-wide RBAC")
            if not any(o["metadata"].get("namespace") == values["watchNamespace"] for o in roles):
                failures.append(f"no Role in the watched namespace {values['watchNamespace']}")
        else:
            expected |= {"ClusterRole", "ClusterRoleBinding"}
        if missing := expected - set(kinds):
            failures.append(f"not rendered: {sorted(missing)}")
    server.shutdown()

    # The objects the operator itself applies, for each example KeyValueCluster.
    operator = os.environ.get("KVFLEET_OPERATOR_BIN")
    if operator:
        examples = os.path.join(os.path.dirname(__file__), "..", "examples")
        for name in sorted(os.listdir(examples)):
            rendered = subprocess.run([operator, "render", os.path.join(examples, name)],
                                      capture_output=True, text=True, timeout=60)
            if rendered.returncode != 0:
                failures.append(f"render {name}: {rendered.stderr.strip()}")
                continue
            objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
            print(f"operator objects for examples/{name}: {', '.join(o['kind'] for o in objects)}")
            for obj in objects:
                try:
                    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                except kubernetes_validate.ValidationError as error:
                    failures.append(f"examples/{name} {obj['kind']}: {error.message} at {list(error.path)}")
    else:
        print("KVFLEET_OPERATOR_BIN not set: the operator's own objects were not validated")
    for failure in failures:
        print("FAIL", failure)
    print("chart check:", "failed" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
