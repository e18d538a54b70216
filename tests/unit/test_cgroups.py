"""Cgroup ids to paths, and the pod UID and container id in a Kubernetes cgroup path."""

from __future__ import annotations

import os

from exporter.kernel.cgroups import CgroupNames, parse_path

UID = "0b7f1e4c-2d3a-4c5b-9e8f-112233445566"
CID = "a" * 64


def test_pod_uid_and_container_id_by_each_driver_and_runtime():
    systemd = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
               f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope")
    assert parse_path(systemd) == {"pod_uid": UID, "container_id": CID}
    assert parse_path(f"/kubepods/besteffort/pod{UID}/{CID}") == \
        {"pod_uid": UID, "container_id": CID}
    assert parse_path(f"/system.slice/docker-{CID}.scope") == {"container_id": CID}
    assert parse_path(f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice") == \
        {"pod_uid": UID}
    assert parse_path("/user.slice/user-0.slice/session-1.scope") == {}


def test_ids_are_directory_inodes_found_by_walking_the_hierarchy(tmp_path):
    container = tmp_path / "kubepods" / f"pod{UID}" / CID
    container.mkdir(parents=True)
    names = CgroupNames(root=tmp_path)
    assert names.describe(os.stat(container).st_ino) == {
        "cgroup": f"/kubepods/pod{UID}/{CID}", "pod_uid": UID, "container_id": CID}
    assert names.describe(os.stat(tmp_path).st_ino) == {"cgroup": "/"}
    assert names.describe(0) == {}
