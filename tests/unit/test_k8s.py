"""The Kubernetes metadata cache against a real HTTP API server (lab/kubeapi.py), through the
real `kubernetes` client: it converges to the truth after every kind of watch event, bookmark,
410 Gone, dropped connection, outage and 403."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from exporter.k8s import RBAC_RULES, Identity
from exporter.k8s.connection import KubernetesConfigError, connect
from exporter.k8s.metadata import KubernetesMetadata
from exporter.k8s.watch import Backoff
from lab import kubeapi
from lab.kubeapi import KubeAPI

GRACE = 1.0
POPULATED = {"pods": 6, "services": 2, "nodes": 1, "replicasets": 1, "jobs": 2}


def populate(api: KubeAPI) -> None:
    api.create("replicasets", kubeapi.replicaset("shop", "web-7d9f", "web"))
    api.create("jobs", kubeapi.job("batch", "report-2911", "report"))
    api.create("jobs", kubeapi.job("batch", "oneoff", None))
    api.create("pods", kubeapi.pod("shop", "web-7d9f-abcde", ["10.0.1.5", "fd00::1:5"],
                                   owner=("ReplicaSet", "web-7d9f"),
                                   labels={"app": "web", "pod-template-hash": "7d9f"}))
    api.create("pods", kubeapi.pod("shop", "db-0", ["10.0.1.6"], owner=("StatefulSet", "db"),
                                   labels={"app": "db"}))
    api.create("pods", kubeapi.pod("batch", "report-2911-xyz", ["10.0.2.7"],
                                   owner=("Job", "report-2911")))
    api.create("pods", kubeapi.pod("batch", "oneoff-q", ["10.0.2.8"], owner=("Job", "oneoff")))
    api.create("pods", kubeapi.pod("default", "debug", ["10.0.3.9"]))
    api.create("pods", kubeapi.pod("kube-system", "proxy-n1", ["192.168.0.11"],
                                   owner=("DaemonSet", "proxy"), host_network=True,
                                   node="node-2"))
    api.create("services", kubeapi.service("shop", "web", {"app": "web"}, "10.96.0.10"))
    api.create("services", kubeapi.service("shop", "db", {"app": "db"}))
    api.create("nodes", kubeapi.node("node-1", ["192.168.0.10"]))


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    with KubeAPI() as server:
        populate(server)
        yield server


def metadata_for(api: KubeAPI) -> KubernetesMetadata:
    client, source = connect(str(api.kubeconfig))
    assert client is not None and source.startswith("kubeconfig")
    return KubernetesMetadata(client, GRACE, backoff=Backoff(0.05, 0.3))


@pytest.fixture
def metadata(api: KubeAPI) -> Iterator[KubernetesMetadata]:
    meta = metadata_for(api)
    meta.start()
    api.wait_for(lambda: meta.state.counts() == POPULATED and meta.health.complete())
    yield meta
    meta.stop()


def web_pod(name: str = "web-7d9f-abcde") -> Identity:
    return Identity("shop", "web", "Deployment", "web", name)


def test_initial_list_resolves_every_kind_of_address(metadata: KubernetesMetadata) -> None:
    resolve = metadata.resolve
    assert resolve("10.0.1.5") == web_pod()
    assert resolve("fd00::1:5") == web_pod()                      # IPv6 of the same pod
    assert resolve("10.0.1.6") == Identity("shop", "db", "StatefulSet", "db", "db-0")
    assert resolve("10.0.2.7") == Identity("batch", "report", "CronJob", "", "report-2911-xyz")
    assert resolve("10.0.2.8") == Identity("batch", "oneoff", "Job", "", "oneoff-q")
    assert resolve("10.0.3.9") == Identity("default", "debug", "Pod", "", "debug")
    # a node's address, and a host-network pod's (its node's) address, are the node
    assert resolve("192.168.0.10") == Identity("", "node-1", "Node", "", "", "node-1")
    assert resolve("192.168.0.11") == Identity("", "node-2", "Node", "", "", "node-2")
    # a ClusterIP is its service, and the one workload behind it
    assert resolve("10.96.0.10") == Identity("shop", "web", "Deployment", "web")
    assert resolve("8.8.8.8") == Identity("", "external")


def test_watch_events_added_modified_deleted(api: KubeAPI,
                                             metadata: KubernetesMetadata) -> None:
    api.create("pods", kubeapi.pod("shop", "web-7d9f-fghij", ["10.0.1.20"],
                                   owner=("ReplicaSet", "web-7d9f"), labels={"app": "web"}))
    api.wait_for(lambda: metadata.resolve("10.0.1.20").workload == "web")
    assert metadata.resolve("10.0.1.20") == web_pod("web-7d9f-fghij")

    # relabelled out of the service's selector
    api.update("pods", kubeapi.pod("shop", "web-7d9f-fghij", ["10.0.1.20"],
                                   owner=("ReplicaSet", "web-7d9f"), labels={"app": "canary"}))
    api.wait_for(lambda: metadata.resolve("10.0.1.20").service == "")

    # a new service selecting it
    api.create("services", kubeapi.service("shop", "canary", {"app": "canary"}))
    api.wait_for(lambda: metadata.resolve("10.0.1.20").service == "canary")

    # deleted: still known for the grace period (late packets), then outside the cluster
    api.delete("pods", "shop", "web-7d9f-fghij")
    api.wait_for(lambda: metadata.state.counts()["pods"] == 6)
    assert metadata.resolve("10.0.1.20").workload == "web"
    api.wait_for(lambda: metadata.resolve("10.0.1.20").workload == "external", GRACE + 5)


def test_address_reused_by_a_new_pod(api: KubeAPI, metadata: KubernetesMetadata) -> None:
    api.delete("pods", "default", "debug")
    api.wait_for(lambda: metadata.state.counts()["pods"] == 5)
    assert metadata.resolve("10.0.3.9").pod == "debug"             # within the grace period
    api.create("pods", kubeapi.pod("shop", "db-1", ["10.0.3.9"], owner=("StatefulSet", "db"),
                                   labels={"app": "db"}))
    api.wait_for(lambda: metadata.resolve("10.0.3.9").pod == "db-1")
    assert metadata.resolve("10.0.3.9") == Identity("shop", "db", "StatefulSet", "db", "db-1")


def test_finished_pod_gives_up_its_address(api: KubeAPI,
                                           metadata: KubernetesMetadata) -> None:
    api.update("pods", kubeapi.pod("batch", "oneoff-q", ["10.0.2.8"], owner=("Job", "oneoff"),
                                   phase="Succeeded"))
    api.create("pods", kubeapi.pod("default", "next", ["10.0.2.8"],
                                   created="2026-11-21T11:00:00Z"))
    api.wait_for(lambda: metadata.resolve("10.0.2.8").pod == "next")


def test_owner_resolved_from_template_hash_before_replicaset_is_seen(
        api: KubeAPI, metadata: KubernetesMetadata) -> None:
    api.create("pods", kubeapi.pod("shop", "api-5c8b-zzzzz", ["10.0.1.30"],
                                   owner=("ReplicaSet", "api-5c8b"),
                                   labels={"pod-template-hash": "5c8b"}))
    api.wait_for(lambda: metadata.resolve("10.0.1.30").workload != "external")
    assert metadata.resolve("10.0.1.30").workload == "api"
    assert metadata.resolve("10.0.1.30").workload_kind == "Deployment"


def test_bookmark_version_is_where_the_next_watch_resumes(
        api: KubeAPI, metadata: KubernetesMetadata) -> None:
    api.create("nodes", kubeapi.node("node-3", ["192.168.0.12"]))   # moves the version on
    api.wait_for(lambda: metadata.resolve("192.168.0.12").node == "node-3")
    watches = api.watches_opened("pods")
    api.bookmark()
    bookmarked = str(api.version)
    pods = next(r for r in metadata.reflectors if r.kind == "pods")
    api.wait_for(lambda: pods.version == bookmarked)
    api.drop_watches()
    api.wait_for(lambda: api.watches_opened("pods") > watches)
    resumed = [q for k, q in api.requests if k == "pods" and q.get("watch")][-1]
    assert resumed["resourceVersion"] == [bookmarked]
    assert resumed["allowWatchBookmarks"] == ["true"]


def test_dropped_connection_resumes_without_relisting(
        api: KubeAPI, metadata: KubernetesMetadata) -> None:
    lists, watches = api.lists_served("pods"), api.watches_opened("pods")
    api.drop_watches()
    api.wait_for(lambda: api.watches_opened("pods") > watches)
    api.create("pods", kubeapi.pod("default", "late", ["10.0.3.50"]))
    api.wait_for(lambda: metadata.resolve("10.0.3.50").pod == "late")
    assert api.lists_served("pods") == lists
    assert metadata.health.error_counts()["pods"] >= 1              # the broken stream


def test_gone_relists_and_notices_what_was_missed(
        api: KubeAPI, metadata: KubernetesMetadata) -> None:
    lists = api.lists_served("pods")
    api.stop()                                   # changes the exporter cannot watch ...
    api.delete("pods", "default", "debug")
    api.create("pods", kubeapi.pod("default", "fresh", ["10.0.3.60"]))
    api.compact()                                # ... and a history too short to replay them
    api.start()
    api.wait_for(lambda: metadata.resolve("10.0.3.60").pod == "fresh")
    assert api.lists_served("pods") > lists
    assert metadata.state.counts()["pods"] == 6
    assert metadata.resolve("10.0.3.9").pod == "debug"            # deleted: grace period
    api.wait_for(lambda: metadata.resolve("10.0.3.9").workload == "external", GRACE + 5)


def test_unreachable_at_start_serves_unknown_then_recovers(
        api: KubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    api.stop()
    meta = metadata_for(api)
    caplog.set_level(logging.INFO, logger="ebpf_net_exporter.k8s")
    meta.start()
    try:
        api.wait_for(lambda: sum(meta.health.error_counts().values()) >= 10)
        assert meta.resolve("10.0.1.5") == Identity("", "unknown")
        assert meta.resolve("8.8.8.8") == Identity("", "unknown")
        outage_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(outage_logs) == 1                      # once per outage, not per retry
        api.start()
        api.wait_for(lambda: meta.resolve("10.0.1.5") == web_pod())
        api.wait_for(meta.health.complete)
        assert meta.resolve("8.8.8.8") == Identity("", "external")
        api.wait_for(lambda: any("reachable again" in r.getMessage() for r in caplog.records))
    finally:
        meta.stop()


def test_forbidden_resource_is_logged_once_naming_verb_and_resource(
        api: KubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    api.forbidden.add("jobs")
    meta = metadata_for(api)
    caplog.set_level(logging.INFO, logger="ebpf_net_exporter.k8s")
    meta.start()
    try:
        api.wait_for(lambda: meta.health.error_counts()["jobs"] >= 3)
        forbidden = [r for r in caplog.records if "forbids" in r.getMessage()]
        assert len(forbidden) == 1
        assert (forbidden[0].verb, forbidden[0].resource) == ("list", "jobs.batch")
        # the rest works; a Job's pod is named after its Job, not its CronJob
        api.wait_for(meta.health.complete)
        assert meta.resolve("10.0.2.7") == Identity("batch", "report-2911", "Job", "",
                                                    "report-2911-xyz")
        assert meta.health.error_counts()["pods"] == 0
    finally:
        meta.stop()


def test_paged_lists_are_read_to_the_end(api: KubeAPI) -> None:
    for index in range(1200):                       # LIST_PAGE is 500: three pages
        api.create("pods", kubeapi.pod("load", f"p{index}", [f"10.9.{index // 250}.{index % 250}"]))
    meta = metadata_for(api)
    meta.start()
    try:
        api.wait_for(lambda: meta.state.counts()["pods"] == 1206)
        assert meta.resolve("10.9.4.199").pod == "p1199"
        assert len([q for k, q in api.requests if k == "pods" and "continue" in q]) == 2
    finally:
        meta.stop()


def test_self_metrics_report_cache_and_errors(metadata: KubernetesMetadata) -> None:
    families = {f.name: f for f in metadata.collect()}
    objects = {s.labels["kind"]: s.value for s in families["ebpf_net_exporter_k8s_objects"].samples}
    assert objects == {"jobs": 2, "nodes": 1, "pods": 6, "replicasets": 1, "services": 2}
    errors = families["ebpf_net_exporter_k8s_watch_errors"].samples
    assert {s.labels["kind"] for s in errors} == set(objects)


def test_rbac_rules_cover_every_watched_kind_and_the_scrape_reviews() -> None:
    granted = {(group, resource, verb) for rule in RBAC_RULES for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    watched = {("", "pods"), ("", "services"), ("", "nodes"), ("apps", "replicasets"),
               ("batch", "jobs")}
    reviews = {("authentication.k8s.io", "tokenreviews", "create"),
               ("authorization.k8s.io", "subjectaccessreviews", "create")}
    assert granted == {(g, r, verb) for g, r in watched for verb in ("list", "watch")} | reviews


def test_no_cluster_configuration_means_kubernetes_off(monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client, reason = connect("")
    assert client is None
    assert reason == "no in-cluster service account and no kubeconfig"


@pytest.mark.parametrize("content", [None, "clusters: [unclosed", "{}"])
def test_unusable_kubeconfig_is_one_line_naming_the_file(tmp_path, content) -> None:
    path = tmp_path / "kubeconfig"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubernetesConfigError, match=rf"^kubeconfig {path}: ") as caught:
        connect(str(path))
    assert "\n" not in str(caught.value)


def test_zones_of_nodes_label_their_pods_and_addresses(api: KubeAPI) -> None:
    meta = metadata_for(api)
    assert meta.has_zones() is False            # asked before the watches start
    api.update("nodes", kubeapi.node("node-1", ["192.168.0.10"], zone="eu-1a"))
    api.create("nodes", kubeapi.node("node-3", ["192.168.0.13"], zone="eu-1b"))
    api.create("pods", kubeapi.pod("shop", "cart-0", ["10.0.4.1"], owner=("StatefulSet", "cart"),
                                   node="node-3"))
    assert meta.has_zones() is True
    meta.start()
    try:
        api.wait_for(lambda: meta.resolve("10.0.4.1").zone == "eu-1b")
        assert meta.resolve("10.0.4.1") == Identity("shop", "cart", "StatefulSet", "", "cart-0",
                                                    zone="eu-1b")
        assert meta.resolve("192.168.0.10").zone == "eu-1a"     # a node: its own zone
        # a ClusterIP: the zone of its backends when they are all in one
        cart_ip = "10.96.0.20"
        api.create("services", kubeapi.service("shop", "cart", {"app": "cart"}, cart_ip))
        api.update("pods", kubeapi.pod("shop", "cart-0", ["10.0.4.1"], labels={"app": "cart"},
                                       owner=("StatefulSet", "cart"), node="node-3"))
        api.wait_for(lambda: meta.resolve("10.0.4.1").service == "cart")
        assert meta.resolve(cart_ip).zone == "eu-1b"
        api.create("pods", kubeapi.pod("shop", "cart-1", ["10.0.4.2"], labels={"app": "cart"},
                                       owner=("StatefulSet", "cart"), node="node-1"))
        api.wait_for(lambda: meta.resolve("10.0.4.2").zone == "eu-1a")
        assert meta.resolve(cart_ip).zone == ""                 # backends in two zones
        assert meta.resolve("8.8.8.8").zone == ""               # outside the cluster
        # a node moved to another zone: its pods' cached identities follow
        api.update("nodes", kubeapi.node("node-3", ["192.168.0.13"], zone="eu-1c"))
        api.wait_for(lambda: meta.resolve("10.0.4.1").zone == "eu-1c")
        api.delete("nodes", "", "node-3")
        api.wait_for(lambda: meta.resolve("10.0.4.1").zone == "")
    finally:
        meta.stop()


def test_zones_unknown_when_the_api_server_cannot_be_asked(api: KubeAPI) -> None:
    meta = metadata_for(api)
    api.stop()
    assert meta.has_zones() is None
