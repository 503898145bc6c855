#!/usr/bin/env python3
"""Prepare `helm template` output for kubernetes-validate.

Usage: split_manifests.py RENDERED.yaml OUT.yaml

Writes every document to OUT.yaml except those of custom-resource kinds, which have no schema
in kubernetes-validate's bundled Kubernetes schemas. Those are skipped by kind, explicitly, and
reported; any other kind is kept, so an unexpected CRD makes kubernetes-validate complain rather
than pass silently. Prints "<kept> <skipped>" counts on the last line for run.sh.
"""

import sys

import yaml

# Kinds rendered by this chart that come from CRDs (Prometheus Operator), by apiVersion.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def main(src: str, dst: str) -> None:
    with open(src) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kept, skipped = [], []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        (skipped if key in CRD_KINDS else kept).append(doc)
    for doc in skipped:
        print(f"  skip {doc['kind']}/{doc['metadata']['name']} ({doc['apiVersion']}): "
              "CRD kind, no schema bundled with kubernetes-validate")
    with open(dst, "w") as f:
        yaml.safe_dump_all(kept, f, sort_keys=False)
    print(f"{len(kept)} {len(skipped)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
