#!/usr/bin/env python3
"""Installs (or upgrades) the Helm chart into a cluster with Helm's own library (helm-sdkpy),
as `helm install` (`helm upgrade`) would.

Usage: chart_install.py KUBECONFIG NAMESPACE RELEASE [VALUES_JSON [upgrade]]
"""
import asyncio
import json
import os
import sys

import helm_sdkpy


def main():
    kubeconfig, namespace, release = sys.argv[1:4]
    values = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    upgrade = len(sys.argv) > 5 and sys.argv[5] == "upgrade"
    chart = os.path.join(os.path.dirname(__file__), "..", "charts", "kvfleet")
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    if upgrade:
        action = helm_sdkpy.Upgrade(config).run(release, chart, values=values, wait=False, timeout=120)
    else:
        action = helm_sdkpy.Install(config).run(release, chart, values=values, wait=False, timeout=120,
                                                create_namespace=True)
    result = asyncio.run(action)
    print(json.dumps({"release": release, "namespace": namespace, "status": str(result.get("info", {}).get("status"))
                      if isinstance(result, dict) else str(result)}))


if __name__ == "__main__":
    main()
