#!/usr/bin/env python3
"""Behaviour tests of the sendable-keys Helm chart.

Renders the chart with `helm template` under many values and asserts what matters in
production: probes, hardening, NetworkPolicy peers, secret handling, the refusal of
multi-replica in-memory setups, environment variable names, checksums, monitoring objects,
the helm test hook and NOTES.txt.

Needs helm (the HELM environment variable, else .tmp/tools/node_modules/.bin/helm, else helm on
PATH) and PyYAML. Run from anywhere: python3 helm/tests/test_chart.py
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: run.sh installs tomli
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHART = REPO / "helm" / "sendable-keys"
EXAMPLES = CHART / "examples"
KUBE_VERSION = "1.30.0"
RELEASE = "rel"
NAMESPACE = "keys"
FULLNAME = f"{RELEASE}-sendable-keys"

# A throwaway pepper for values that need one; never a real secret.
TEST_PEPPER = "test-pepper-0123456789abcdef0123456789abcdef"
# Sentinels: if one of these ever shows up in rendered output, a secret leaked.
SENTINEL_PEPPER = "LEAKCHECK-pepper-must-never-be-rendered-000000"
SENTINEL_PASSWORD = "LEAKCHECKredispassword"
SENTINEL_URL = f"rediss://:{SENTINEL_PASSWORD}@redis.example:6380"
SENTINEL_HASH = "ab" * 32

CALLERS = [
    {"name": "notification-service", "role": "service", "tokenSha256": "1" * 64},
    {"name": "chat-service", "role": "service", "tokenSha256": "2" * 64},
    {"name": "ops", "role": "admin", "tokenSha256": "3" * 64},
]


def find_helm() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    local = REPO / ".tmp" / "tools" / "node_modules" / ".bin" / "helm"
    if local.exists():
        return str(local)
    found = shutil.which("helm")
    if not found:
        sys.exit("helm not found: run helm/tests/run.sh, or set HELM")
    return found


HELM = find_helm()


class RenderError(Exception):
    pass


def render_text(values: dict | None = None, files=(), chart: Path = CHART) -> str:
    """helm template with the values (a dict written to a file) and values files, in order."""
    cmd = [HELM, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
           "--kube-version", KUBE_VERSION]
    for f in files:
        cmd += ["-f", str(f)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(values or {}, tmp)
    try:
        cmd += ["-f", tmp.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(tmp.name)
    if proc.returncode != 0:
        raise RenderError(proc.stderr)
    return proc.stdout


def render(values: dict | None = None, files=()) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(values, files)) if d]


def example(name: str) -> Path:
    return EXAMPLES / name


def kinds(docs) -> list[str]:
    return sorted(d["kind"] for d in docs)


def only(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}: {kinds(docs)}"
    return found[0]


def server(docs) -> dict:
    return only(docs, "Deployment", FULLNAME)


def container(docs) -> dict:
    return server(docs)["spec"]["template"]["spec"]["containers"][0]


def env(docs) -> dict[str, dict]:
    """Env entries of the server container by name (each name at most once)."""
    entries = container(docs)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e for e in entries}


def env_value(docs, name: str) -> str:
    entry = env(docs)[name]
    assert "valueFrom" not in entry, f"{name} should be a plain value"
    return entry["value"]


def deep_merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = deep_merge(out[k], v)
            else:
                out[k] = v
    return out


EXTERNAL = {
    "redis": {"mode": "external", "external": {"urls": ["redis://redis.keys.svc:6379"]}},
    "secrets": {"pepper": TEST_PEPPER},
}


def mounted_file_paths(docs) -> set[str]:
    """Every file path the server container sees through its volume mounts."""
    spec = server(docs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    paths = set()
    for m in container(docs)["volumeMounts"]:
        vol = volumes[m["name"]]
        if "configMap" in vol:
            cm = only(docs, "ConfigMap", vol["configMap"]["name"])
            paths |= {f"{m['mountPath']}/{k}" for k in cm["data"]}
        elif "secret" in vol:
            paths |= {f"{m['mountPath']}/{i['path']}" for i in vol["secret"]["items"]}
    return paths


class Defaults(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = render()

    def test_renders_the_expected_resources(self):
        self.assertEqual(
            kinds(self.docs),
            ["ConfigMap", "Deployment", "NetworkPolicy", "Pod", "Service", "ServiceAccount"],
        )

    def test_default_values_hold_no_secret(self):
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        self.assertEqual(values["secrets"]["pepper"], "")
        self.assertEqual(values["secrets"]["existingSecret"], "")
        self.assertEqual(values["auth"]["callers"], [])
        self.assertEqual(values["redis"]["external"]["urls"], [])
        self.assertEqual(values["redis"]["mode"], "memory")
        text = (CHART / "values.yaml").read_text()
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            self.assertNotRegex(line, r"redis(s)?://", "no Redis URL in the defaults")
            self.assertNotRegex(line.lower(), r"password\s*:", "no password in the defaults")

    def test_defaults_render_no_secret_material(self):
        out = render_text()
        self.assertNotIn("kind: Secret", out)
        self.assertNotIn("secretKeyRef", out)
        self.assertNotIn("REDIS_URL", out)
        self.assertNotIn("PEPPER", out)
        for doc in self.docs:
            self.assertNotIn("stringData", doc)

    def test_memory_mode_single_replica(self):
        self.assertEqual(server(self.docs)["spec"]["replicas"], 1)

    def test_listen_addresses_and_log_format(self):
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_LISTEN"), "0.0.0.0:50051")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_ADMIN_LISTEN"), "0.0.0.0:9090")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_LOG_FORMAT"), "json")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_LOG"), "info")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_DRAIN_TIMEOUT"), "20s")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_ALERT_POLL_INTERVAL"), "10s")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_USAGE_RETENTION_DAYS"), "90")
        self.assertEqual(env_value(self.docs, "SENDABLE_KEYS_AUDIT_RETENTION_DAYS"), "365")
        self.assertEqual(env_value(self.docs, "OTEL_SERVICE_NAME"), "sendable-keys")
        self.assertNotIn("OTEL_EXPORTER_OTLP_ENDPOINT", env(self.docs))

    def test_config_files_are_mounted_where_the_env_points(self):
        paths = mounted_file_paths(self.docs)
        for name in ("SENDABLE_KEYS_PLANS_FILE", "SENDABLE_KEYS_ALERTS_FILE"):
            self.assertIn(env_value(self.docs, name), paths)

    def test_ports_and_service(self):
        ports = {p["name"]: p["containerPort"] for p in container(self.docs)["ports"]}
        self.assertEqual(ports, {"grpc": 50051, "metrics": 9090})
        svc = only(self.docs, "Service", FULLNAME)
        sports = {p["name"]: p for p in svc["spec"]["ports"]}
        self.assertEqual(sports["grpc"]["port"], 50051)
        self.assertEqual(sports["grpc"]["appProtocol"], "grpc")
        self.assertEqual(sports["grpc"]["targetPort"], "grpc")
        self.assertEqual(sports["metrics"]["port"], 9090)
        self.assertEqual(
            svc["spec"]["selector"],
            server(self.docs)["spec"]["selector"]["matchLabels"],
        )

    def test_resources_have_requests_and_limits(self):
        res = container(self.docs)["resources"]
        self.assertEqual(set(res["requests"]), {"cpu", "memory"})
        self.assertEqual(set(res["limits"]), {"cpu", "memory"})

    def test_grace_period_exceeds_drain(self):
        spec = server(self.docs)["spec"]["template"]["spec"]
        self.assertGreaterEqual(spec["terminationGracePeriodSeconds"], 20 + 2)
        self.assertNotIn("lifecycle", container(self.docs), "no preStop: distroless has no shell")

    def test_topology_spread_zone_and_hostname(self):
        spec = server(self.docs)["spec"]["template"]["spec"]
        tsc = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
        self.assertEqual(set(tsc), {"topology.kubernetes.io/zone", "kubernetes.io/hostname"})
        selector = server(self.docs)["spec"]["selector"]["matchLabels"]
        for c in tsc.values():
            self.assertEqual(c["whenUnsatisfiable"], "ScheduleAnyway")
            self.assertEqual(c["labelSelector"]["matchLabels"], selector)

    def test_standard_labels_everywhere(self):
        for doc in self.docs:
            labels = doc["metadata"]["labels"]
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                        "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                        "app.kubernetes.io/component", "helm.sh/chart"):
                self.assertIn(key, labels, f"{doc['kind']} lacks {key}")
            self.assertEqual(labels["app.kubernetes.io/managed-by"], "Helm")
            self.assertEqual(labels["app.kubernetes.io/instance"], RELEASE)

    def test_no_monitoring_objects_by_default(self):
        self.assertNotIn("ServiceMonitor", kinds(self.docs))
        self.assertNotIn("PrometheusRule", kinds(self.docs))
        self.assertNotIn("HorizontalPodAutoscaler", kinds(self.docs))
        self.assertNotIn("PodDisruptionBudget", kinds(self.docs))


class Probes(unittest.TestCase):
    def test_native_grpc_probes_without_tls(self):
        c = container(render())
        self.assertEqual(c["readinessProbe"]["grpc"], {"port": 50051})
        self.assertEqual(c["livenessProbe"]["grpc"], {"port": 50051, "service": "liveness"})
        self.assertEqual(c["startupProbe"]["grpc"], {"port": 50051, "service": "liveness"})
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            self.assertNotIn("httpGet", c[probe])

    def test_http_probes_on_admin_port_with_tls(self):
        docs = render({"tls": {"enabled": True, "existingSecret": "keys-tls"}})
        c = container(docs)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez"),
                            ("startupProbe", "/livez")):
            self.assertNotIn("grpc", c[probe], probe)
            get = c[probe]["httpGet"]
            self.assertEqual(get["path"], path)
            port = ports.get(get["port"], get["port"])
            self.assertEqual(port, 9090, probe)

    def test_tls_env_and_mount(self):
        docs = render({"tls": {"enabled": True, "existingSecret": "keys-tls", "mtls": True}})
        e = env(docs)
        paths = mounted_file_paths(docs)
        for name in ("SENDABLE_KEYS_TLS_CERT", "SENDABLE_KEYS_TLS_KEY", "SENDABLE_KEYS_TLS_CLIENT_CA"):
            self.assertIn(e[name]["value"], paths, name)
        vol = {v["name"]: v for v in server(docs)["spec"]["template"]["spec"]["volumes"]}["tls"]
        self.assertEqual(vol["secret"]["secretName"], "keys-tls")
        # Plain TLS: no client CA.
        docs = render({"tls": {"enabled": True, "existingSecret": "keys-tls"}})
        self.assertNotIn("SENDABLE_KEYS_TLS_CLIENT_CA", env(docs))
        self.assertIn("SENDABLE_KEYS_TLS_CERT", env(docs))

    def test_tls_needs_a_secret(self):
        with self.assertRaisesRegex(RenderError, "tls.existingSecret"):
            render({"tls": {"enabled": True}})


class Hardening(unittest.TestCase):
    def assert_hardened(self, pod_spec: dict, user: int):
        psc = pod_spec["securityContext"]
        self.assertTrue(psc["runAsNonRoot"])
        self.assertEqual(psc["runAsUser"], user)
        self.assertEqual(psc["seccompProfile"]["type"], "RuntimeDefault")
        self.assertIs(pod_spec["automountServiceAccountToken"], False)
        for c in pod_spec["containers"]:
            sc = c["securityContext"]
            self.assertTrue(sc["runAsNonRoot"], c["name"])
            self.assertEqual(sc["runAsUser"], user, c["name"])
            self.assertIs(sc["readOnlyRootFilesystem"], True, c["name"])
            self.assertIs(sc["allowPrivilegeEscalation"], False, c["name"])
            self.assertEqual(sc["capabilities"]["drop"], ["ALL"], c["name"])
            self.assertNotIn("add", sc["capabilities"], c["name"])
            self.assertEqual(sc["seccompProfile"]["type"], "RuntimeDefault", c["name"])

    def test_server_pod(self):
        docs = render()
        self.assert_hardened(server(docs)["spec"]["template"]["spec"], 65532)
        self.assertIs(only(docs, "ServiceAccount")["automountServiceAccountToken"], False)

    def test_test_pod(self):
        self.assert_hardened(only(render(), "Pod")["spec"], 65532)

    def test_dev_redis_pod(self):
        docs = render({"redis": {"mode": "dev"}})
        redis = only(docs, "Deployment", f"{FULLNAME}-redis")
        self.assert_hardened(redis["spec"]["template"]["spec"], 999)


class NetworkPolicies(unittest.TestCase):
    @staticmethod
    def rules_by_port(policy: dict) -> dict[int, list]:
        out: dict[int, list] = {}
        for rule in policy["spec"]["ingress"]:
            assert rule.get("ports"), "every ingress rule must name its ports"
            assert rule.get("from"), "every ingress rule must name its peers"
            for p in rule["ports"]:
                out.setdefault(p["port"], []).extend(rule["from"])
        return out

    def test_default_peers(self):
        docs = render()
        np = only(docs, "NetworkPolicy")
        self.assertEqual(np["spec"]["policyTypes"], ["Ingress"])
        self.assertEqual(np["spec"]["podSelector"]["matchLabels"],
                         server(docs)["spec"]["selector"]["matchLabels"])
        rules = self.rules_by_port(np)
        self.assertEqual(set(rules), {50051, 9090})
        grpc_names = {p["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
                      for p in rules[50051] if "podSelector" in p}
        self.assertTrue({"notification", "chat", "marketing"} <= grpc_names, grpc_names)
        # The only other gRPC peer is this release's helm test pod.
        test_pod_labels = only(docs, "Pod")["metadata"]["labels"]
        others = [p for p in rules[50051]
                  if p["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
                  not in {"notification", "chat", "marketing"}]
        self.assertEqual(len(others), 1)
        for k, v in others[0]["podSelector"]["matchLabels"].items():
            self.assertEqual(test_pod_labels[k], v)
        self.assertEqual(rules[9090], [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}])

    def test_custom_peers_are_honoured(self):
        grpc = [
            {"namespaceSelector": {"matchLabels": {"team": "messaging"}},
             "podSelector": {"matchLabels": {"app": "notifier"}}},
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "billing"}}},
        ]
        metrics = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
        docs = render({"networkPolicy": {"grpcPeers": grpc, "metricsPeers": metrics},
                       "tests": {"enabled": False}})
        rules = self.rules_by_port(only(docs, "NetworkPolicy"))
        self.assertEqual(rules[50051], grpc)
        self.assertEqual(rules[9090], metrics)

    def test_can_be_disabled(self):
        self.assertNotIn("NetworkPolicy", kinds(render({"networkPolicy": {"enabled": False}})))

    def test_dev_redis_admits_only_the_server(self):
        docs = render({"redis": {"mode": "dev"}})
        np = only(docs, "NetworkPolicy", f"{FULLNAME}-redis")
        (rule,) = np["spec"]["ingress"]
        self.assertEqual(rule["ports"], [{"port": 6379, "protocol": "TCP"}])
        self.assertEqual(rule["from"], [{"podSelector": {"matchLabels":
                                        server(docs)["spec"]["selector"]["matchLabels"]}}])


class Secrets(unittest.TestCase):
    def test_existing_secret_renders_no_secret_and_leaks_nothing(self):
        values = {
            "redis": {"mode": "external", "external": {"urls": [SENTINEL_URL]}},
            "secrets": {
                "existingSecret": "keys-prod",
                "existingSecretKeys": {"pepper": "hash-pepper", "credentials": "callers.toml",
                                       "redisUrl": "redis-urls"},
                # Set but must be ignored: existingSecret wins and nothing is inlined.
                "pepper": SENTINEL_PEPPER,
            },
            "auth": {"callers": [{"name": "leak", "role": "admin", "tokenSha256": SENTINEL_HASH}]},
        }
        out = render_text(values)
        docs = [d for d in yaml.safe_load_all(out) if d]
        self.assertNotIn("Secret", kinds(docs))
        for needle in (SENTINEL_PEPPER, SENTINEL_PASSWORD, SENTINEL_URL, SENTINEL_HASH):
            self.assertNotIn(needle, out)
            self.assertNotIn(base64.b64encode(needle.encode()).decode(), out)
        e = env(docs)
        self.assertEqual(e["REDIS_URL"]["valueFrom"]["secretKeyRef"],
                         {"name": "keys-prod", "key": "redis-urls"})
        self.assertNotIn("value", e["REDIS_URL"])
        vol = {v["name"]: v for v in server(docs)["spec"]["template"]["spec"]["volumes"]}["secrets"]
        self.assertEqual(vol["secret"]["secretName"], "keys-prod")
        self.assertEqual({i["key"]: i["path"] for i in vol["secret"]["items"]},
                         {"hash-pepper": "pepper", "callers.toml": "credentials.toml"})
        paths = mounted_file_paths(docs)
        self.assertIn(e["SENDABLE_KEYS_PEPPER_FILE"]["value"], paths)
        self.assertIn(e["SENDABLE_KEYS_CREDENTIALS_FILE"]["value"], paths)
        annotations = server(docs)["spec"]["template"]["metadata"]["annotations"]
        self.assertNotIn("checksum/secret", annotations)

    def test_existing_secret_example(self):
        out = render_text(files=[example("existing-secret.yaml")])
        docs = [d for d in yaml.safe_load_all(out) if d]
        self.assertNotIn("Secret", kinds(docs))
        self.assertEqual(env(docs)["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"], "sendable-keys-prod")

    def test_chart_secret_holds_pepper_url_and_credentials(self):
        values = deep_merge(EXTERNAL, {"auth": {"callers": CALLERS}})
        out = render_text(values)
        docs = [d for d in yaml.safe_load_all(out) if d]
        secret = only(docs, "Secret")
        self.assertNotIn("stringData", secret)
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        self.assertEqual(set(data), {"pepper", "redis-url", "credentials.toml"})
        self.assertEqual(data["pepper"], TEST_PEPPER)
        self.assertEqual(data["redis-url"], "redis://redis.keys.svc:6379")
        creds = tomllib.loads(data["credentials.toml"])
        self.assertEqual(creds["caller"], [
            {"name": c["name"], "role": c["role"], "token_sha256": c["tokenSha256"]} for c in CALLERS])
        # Plain text appears only base64-encoded in the Secret.
        self.assertNotIn(TEST_PEPPER, out)
        self.assertNotIn("redis://redis.keys.svc", out)
        e = env(docs)
        self.assertEqual(e["REDIS_URL"]["valueFrom"]["secretKeyRef"], {"name": FULLNAME, "key": "redis-url"})
        paths = mounted_file_paths(docs)
        self.assertIn(e["SENDABLE_KEYS_PEPPER_FILE"]["value"], paths)
        self.assertIn(e["SENDABLE_KEYS_CREDENTIALS_FILE"]["value"], paths)

    def test_memory_mode_with_callers_has_only_credentials(self):
        docs = render({"auth": {"callers": CALLERS}})
        self.assertEqual(set(only(docs, "Secret")["data"]), {"credentials.toml"})
        e = env(docs)
        self.assertIn("SENDABLE_KEYS_CREDENTIALS_FILE", e)
        self.assertNotIn("REDIS_URL", e)
        self.assertNotIn("SENDABLE_KEYS_PEPPER_FILE", e)

    def test_external_redis_requires_pepper_and_urls(self):
        with self.assertRaisesRegex(RenderError, "pepper"):
            render({"redis": {"mode": "external", "external": {"urls": ["redis://r:6379"]}}})
        with self.assertRaisesRegex(RenderError, "redis.external.urls"):
            render({"redis": {"mode": "external"}, "secrets": {"pepper": TEST_PEPPER}})

    def test_secrets_refused_as_plain_extra_env(self):
        for name in ("REDIS_URL", "SENDABLE_KEYS_PEPPER"):
            with self.subTest(name=name), self.assertRaisesRegex(RenderError, "secretKeyRef"):
                render({"extraEnv": [{"name": name, "value": SENTINEL_URL}]})
        docs = render({"extraEnv": [{"name": "SENDABLE_KEYS_PEPPER", "valueFrom": {
            "secretKeyRef": {"name": "s", "key": "k"}}}]})
        self.assertIn("SENDABLE_KEYS_PEPPER", env(docs))

    def test_short_pepper_is_refused(self):
        with self.assertRaises(RenderError):
            render(deep_merge(EXTERNAL, {"secrets": {"pepper": "too-short"}}))

    def test_every_redis_url_comes_from_a_secret(self):
        scenarios = [
            ({}, [example("ha.yaml")]),
            ({}, [example("dev-redis.yaml")]),
            ({}, [example("existing-secret.yaml")]),
            ({"secrets": {"pepper": TEST_PEPPER}}, [example("external-cluster.yaml")]),
            (EXTERNAL, []),
        ]
        for values, files in scenarios:
            with self.subTest(files=[f.name for f in files]):
                docs = render(values, files)
                entry = env(docs)["REDIS_URL"]
                self.assertEqual(set(entry), {"name", "valueFrom"})
                self.assertIn("secretKeyRef", entry["valueFrom"])
                for doc in docs:
                    if doc["kind"] == "ConfigMap":
                        self.assertNotIn("redis://", yaml.safe_dump(doc))


class StoreModes(unittest.TestCase):
    def test_memory_mode_refuses_several_replicas(self):
        with self.assertRaisesRegex(RenderError, "redis.mode=memory"):
            render({"replicaCount": 2})

    def test_memory_mode_refuses_autoscaling(self):
        with self.assertRaisesRegex(RenderError, "redis.mode=memory"):
            render({"autoscaling": {"enabled": True}})

    def test_redis_allows_replicas(self):
        self.assertEqual(server(render(deep_merge(EXTERNAL, {"replicaCount": 4})))["spec"]["replicas"], 4)
        self.assertEqual(server(render({"redis": {"mode": "dev"}, "replicaCount": 3}))["spec"]["replicas"], 3)

    def test_redis_env(self):
        self.assertEqual(env_value(render(EXTERNAL), "SENDABLE_KEYS_REDIS_BATCHING"), "true")
        docs = render(deep_merge(EXTERNAL, {"redis": {"cluster": True, "poolSize": 8, "batching": False,
                                                      "prefix": "skprod", "timeout": "750ms"}}))
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_REDIS_BATCHING"), "false")
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_REDIS_CLUSTER"), "true")
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_REDIS_POOL_SIZE"), "8")
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_REDIS_PREFIX"), "skprod")
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_REDIS_TIMEOUT"), "750ms")
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_PEPPER_FILE"), "/etc/sendable-keys/secrets/pepper")

    def test_external_cluster_example(self):
        docs = render({"secrets": {"pepper": TEST_PEPPER}}, [example("external-cluster.yaml")])
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_REDIS_CLUSTER"), "true")
        urls = base64.b64decode(only(docs, "Secret")["data"]["redis-url"]).decode().split(",")
        self.assertGreaterEqual(len(urls), 3)
        self.assertTrue(all(u.startswith("redis://") for u in urls))

    def test_dev_redis(self):
        docs = render(files=[example("dev-redis.yaml")])
        redis = only(docs, "Deployment", f"{FULLNAME}-redis")
        c = redis["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(c["image"], "redis:7-alpine")
        self.assertEqual(redis["spec"]["replicas"], 1)
        self.assertFalse([v for v in redis["spec"]["template"]["spec"]["volumes"]
                          if "persistentVolumeClaim" in v], "dev Redis has no persistence")
        svc = only(docs, "Service", f"{FULLNAME}-redis")
        self.assertEqual(svc["spec"]["ports"][0]["port"], 6379)
        secret = only(docs, "Secret")
        url = base64.b64decode(secret["data"]["redis-url"]).decode()
        self.assertEqual(url, f"redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379")
        self.assertGreaterEqual(len(base64.b64decode(secret["data"]["pepper"])), 32)
        # The server selector must not pick up the Redis pod.
        self.assertNotEqual(redis["spec"]["selector"]["matchLabels"],
                            server(docs)["spec"]["selector"]["matchLabels"])

    def test_dev_redis_cannot_use_existing_secret(self):
        with self.assertRaises(RenderError):
            render({"redis": {"mode": "dev"}, "secrets": {"existingSecret": "x"}})


class Scaling(unittest.TestCase):
    def test_ha_example(self):
        docs = render(files=[example("ha.yaml")])
        hpa = only(docs, "HorizontalPodAutoscaler")
        self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
        self.assertGreaterEqual(hpa["spec"]["minReplicas"], 3)
        self.assertEqual(hpa["spec"]["scaleTargetRef"],
                         {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME})
        (metric,) = [m for m in hpa["spec"]["metrics"] if m["resource"]["name"] == "cpu"]
        self.assertEqual(metric["resource"]["target"]["type"], "Utilization")
        pdb = only(docs, "PodDisruptionBudget")
        self.assertEqual(pdb["apiVersion"], "policy/v1")
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"],
                         server(docs)["spec"]["selector"]["matchLabels"])
        self.assertTrue(("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]))
        self.assertNotIn("replicas", server(docs)["spec"], "the HPA owns the replica count")
        self.assertIn("REDIS_URL", env(docs))

    def test_pdb_defaults_to_max_unavailable(self):
        docs = render(deep_merge(EXTERNAL, {"podDisruptionBudget": {"enabled": True}}))
        self.assertEqual(only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"], 1)

    def test_drain_must_fit_in_grace_period(self):
        with self.assertRaisesRegex(RenderError, "drainTimeout"):
            render({"config": {"drainTimeout": "30s"}, "terminationGracePeriodSeconds": 30})
        with self.assertRaisesRegex(RenderError, "drainTimeout"):
            render({"config": {"drainTimeout": "1m"}, "terminationGracePeriodSeconds": 45})
        docs = render({"config": {"drainTimeout": "28s"}, "terminationGracePeriodSeconds": 30})
        self.assertEqual(env_value(docs, "SENDABLE_KEYS_DRAIN_TIMEOUT"), "28s")


class ConfigAndChecksums(unittest.TestCase):
    def test_toml_files(self):
        cm = only(render(), "ConfigMap")
        plans = tomllib.loads(cm["data"]["plans.toml"])
        self.assertEqual(plans["free"], {"max_keys": 3, "rate_limit_per_minute": 60})
        self.assertEqual(plans["starter"], {"max_keys": 10, "rate_limit_per_minute": 300})
        self.assertEqual(plans["pro"], {"max_keys": 0, "rate_limit_per_minute": 1000})
        alerts = tomllib.loads(cm["data"]["alerts.toml"])
        self.assertEqual(alerts["near_rate_limit"], {"fire": 0.8, "resolve": 0.7})
        self.assertEqual(alerts["high_error_rate"], {"fire": 0.1, "resolve": 0.05, "min_outcomes": 20})
        self.assertEqual(alerts["traffic_spike"], {"fire": 3.0, "resolve": 2.0, "min_requests": 100})
        self.assertIsInstance(alerts["traffic_spike"]["fire"], float)

    def test_alert_resolve_must_be_below_fire(self):
        # The server refuses these at startup; the chart refuses them at install.
        for name in ("nearRateLimit", "highErrorRate", "trafficSpike"):
            with self.subTest(alert=name):
                with self.assertRaisesRegex(RenderError, f"config.alerts.{name}: resolve"):
                    render({"config": {"alerts": {name: {"fire": 0.5, "resolve": 0.5}}}})
                with self.assertRaises(RenderError):
                    render({"config": {"alerts": {name: {"fire": 0.5, "resolve": 0}}}})
        cm = only(render({"config": {"alerts": {"nearRateLimit": {"fire": 0.9, "resolve": 0.85}}}}),
                  "ConfigMap")
        alerts = tomllib.loads(cm["data"]["alerts.toml"])
        self.assertEqual(alerts["near_rate_limit"], {"fire": 0.9, "resolve": 0.85})

    def test_custom_enterprise_plan(self):
        cm = only(render({"config": {"plans": {"enterprise": {"rateLimitPerMinute": 20000}}}}), "ConfigMap")
        plans = tomllib.loads(cm["data"]["plans.toml"])
        self.assertEqual(plans["enterprise"], {"rate_limit_per_minute": 20000})

    def annotations(self, values):
        return server(render(values))["spec"]["template"]["metadata"]["annotations"]

    def test_config_change_rolls_pods(self):
        base = self.annotations({})
        self.assertRegex(base["checksum/config"], r"^[0-9a-f]{64}$")
        self.assertEqual(base, self.annotations({}), "checksums are deterministic")
        changed = self.annotations({"config": {"plans": {"free": {"rateLimitPerMinute": 120}}}})
        self.assertNotEqual(base["checksum/config"], changed["checksum/config"])

    def test_secret_change_rolls_pods(self):
        a = self.annotations(EXTERNAL)
        self.assertRegex(a["checksum/secret"], r"^[0-9a-f]{64}$")
        self.assertEqual(a, self.annotations(EXTERNAL))
        b = self.annotations(deep_merge(EXTERNAL, {"auth": {"callers": CALLERS}}))
        self.assertNotEqual(a["checksum/secret"], b["checksum/secret"])
        self.assertEqual(a["checksum/config"], b["checksum/config"])

    def test_otel_endpoint(self):
        docs = render({"otel": {"endpoint": "http://otel:4317", "serviceName": "keys"}})
        self.assertEqual(env_value(docs, "OTEL_EXPORTER_OTLP_ENDPOINT"), "http://otel:4317")
        self.assertEqual(env_value(docs, "OTEL_SERVICE_NAME"), "keys")


class Monitoring(unittest.TestCase):
    def test_monitoring_example(self):
        docs = render(files=[example("monitoring.yaml")])
        sm = only(docs, "ServiceMonitor")
        self.assertEqual(sm["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(sm["spec"]["endpoints"][0]["port"], "metrics")
        self.assertEqual(sm["spec"]["endpoints"][0]["path"], "/metrics")
        svc = only(docs, "Service", FULLNAME)
        for k, v in sm["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(svc["metadata"]["labels"][k], v)
        rule = only(docs, "PrometheusRule")
        rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
        exprs = " ".join(r["expr"] for r in rules)
        for metric in ("sendable_keys_grpc_requests_total", "sendable_keys_store_errors_total",
                       "sendable_keys_grpc_request_duration_seconds_bucket"):
            self.assertIn(metric, exprs)
        names = {r["alert"] for r in rules}
        self.assertIn("SendableKeysHighErrorRate", names)
        for r in rules:
            self.assertIn(r["labels"]["severity"], {"critical", "warning", "info"})
            self.assertTrue(r["annotations"]["summary"])
        # Prometheus' own templating survives Helm's.
        (high,) = [r for r in rules if r["alert"] == "SendableKeysHighErrorRate"]
        self.assertIn("{{ $value | humanizePercentage }}", high["annotations"]["description"])

    def test_each_toggle_alone(self):
        docs = render({"metrics": {"serviceMonitor": {"enabled": True}}})
        self.assertIn("ServiceMonitor", kinds(docs))
        self.assertNotIn("PrometheusRule", kinds(docs))
        docs = render({"metrics": {"prometheusRule": {"enabled": True}}})
        self.assertIn("PrometheusRule", kinds(docs))
        self.assertNotIn("ServiceMonitor", kinds(docs))

    def test_headless_service_does_not_double_scrape(self):
        docs = render({"service": {"headless": {"enabled": True}}})
        headless = only(docs, "Service", f"{FULLNAME}-headless")
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertEqual([p["name"] for p in headless["spec"]["ports"]], ["grpc"])


class HelmTest(unittest.TestCase):
    def test_hook_pod(self):
        docs = render()
        pod = only(docs, "Pod")
        self.assertEqual(pod["metadata"]["annotations"]["helm.sh/hook"], "test")
        self.assertEqual(pod["spec"]["restartPolicy"], "Never")
        (c,) = pod["spec"]["containers"]
        self.assertEqual(c["image"], container(docs)["image"])
        self.assertEqual(c["args"], ["health", "--addr", f"http://{FULLNAME}.{NAMESPACE}.svc:50051"])
        # The Service must not route traffic to the test pod.
        selector = only(docs, "Service", FULLNAME)["spec"]["selector"]
        self.assertFalse(all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()))

    def test_trusts_the_tls_ca(self):
        docs = render({"tls": {"enabled": True, "existingSecret": "keys-tls"}})
        (c,) = only(docs, "Pod")["spec"]["containers"]
        self.assertEqual(
            c["args"],
            ["health", "--addr", f"https://{FULLNAME}.{NAMESPACE}.svc:50051",
             "--tls-ca", "/etc/sendable-keys/tls/ca.crt"],
        )

    def test_can_be_disabled(self):
        self.assertNotIn("Pod", kinds(render({"tests": {"enabled": False}})))


class Schema(unittest.TestCase):
    def test_rejects_bad_values(self):
        bad = [
            {"redis": {"mode": "cluster"}},
            {"unknownTopLevel": True},
            {"config": {"drainTimeout": "20"}},
            {"config": {"logFormat": "xml"}},
            {"auth": {"callers": [{"name": "x", "role": "root", "tokenSha256": "1" * 64}]}},
            {"auth": {"callers": [{"name": "x", "role": "service", "tokenSha256": "not-hex"}]}},
            {"redis": {"external": {"urls": ["http://redis:6379"]}}},
            {"service": {"type": "ExternalName"}},
            {"replicaCount": "3"},
            {"networkPolicy": {"grpcPeers": [{"podSelecter": {}}]}},
        ]
        for values in bad:
            with self.subTest(values=values), self.assertRaises(RenderError):
                render(values)


class Notes(unittest.TestCase):
    """NOTES.txt is not rendered by `helm template`; render it through a copy of the chart."""

    @staticmethod
    def notes(values: dict | None = None) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / "sendable-keys"
            shutil.copytree(CHART, chart)
            text = (chart / "templates" / "NOTES.txt").read_text()
            (chart / "templates" / "_notes_probe.tpl").write_text(
                '{{- define "notes-probe.text" -}}\n' + text + "\n{{- end -}}\n")
            (chart / "templates" / "notes-probe.yaml").write_text(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\n"
                'data:\n  notes: {{ include "notes-probe.text" . | toJson }}\n')
            docs = [d for d in yaml.safe_load_all(render_text(values, chart=chart)) if d]
            return only(docs, "ConfigMap", "notes-probe")["data"]["notes"]

    def test_grpcurl_examples(self):
        text = self.notes()
        self.assertIn("grpc.health.v1.Health/Check", text)
        self.assertIn("describe sendable.keys.v1.KeyService", text)
        for rpc in ("CreateSession", "CreateKey", "VerifyKey"):
            self.assertIn(f"sendable.keys.v1.KeyService/{rpc}", text)
        self.assertIn('-H "authorization: Bearer $TOKEN"', text)
        self.assertIn("-plaintext", text)
        self.assertIn(f"port-forward svc/{FULLNAME}", text)
        self.assertIn(f"helm test {RELEASE}", text)

    def test_warnings(self):
        text = self.notes()
        self.assertIn("IN-MEMORY STORE", text)
        self.assertIn("NO CALLER CREDENTIALS", text)
        dev = self.notes({"redis": {"mode": "dev"}, "auth": {"callers": CALLERS}})
        self.assertIn("DEVELOPMENT REDIS", dev)
        self.assertNotIn("NO CALLER CREDENTIALS", dev)
        self.assertNotIn("IN-MEMORY STORE", dev)

    def test_tls_flags(self):
        text = self.notes({"tls": {"enabled": True, "existingSecret": "t", "mtls": True}})
        self.assertNotIn("-plaintext", text)
        self.assertIn('export TLS_FLAGS="-cacert ./ca.crt', text)
        self.assertIn("-cert ./client.crt", text)
        self.assertIn("grpcurl $TLS_FLAGS localhost:50051 grpc.health.v1.Health/Check", text)

    def test_existing_secret_keys_listed(self):
        text = self.notes({"redis": {"mode": "external"}, "secrets": {
            "existingSecret": "prod", "existingSecretKeys": {"pepper": "p", "redisUrl": "u",
                                                             "credentials": "c.toml"}}})
        self.assertIn("existing Secret prod (keys read: p, u, c.toml)", text)


if __name__ == "__main__":
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"chart: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(0 if result.wasSuccessful() else 1)
