"""Prepares the kernel environment bcc needs, or says in one line what is missing.

- privileges: CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN stands in for the first two)
- tracefs mounted (bcc attaches tracepoints through it); mounted here when absent
- kernel headers for bcc's compiler: BCC_KERNEL_SOURCE, /lib/modules/$(uname -r)/build, or
  Debian's split linux-headers packages in /usr/src merged into one tree under /run"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .. import logs

log = logs.get("environment")

CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
MERGED_HEADERS = Path("/run/ebpf-net-exporter/kernel-headers")
KCONFIG = Path("include/linux/kconfig.h")


class EnvironmentProblem(Exception):
    """The kernel environment cannot run the exporter; the message says what to do."""


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(effective: int) -> list[str]:
    def has(name: str) -> bool:
        return bool(effective >> CAPABILITIES[name] & 1)

    missing = []
    if not has("CAP_BPF") and not has("CAP_SYS_ADMIN"):
        missing.append("CAP_BPF")
    if not has("CAP_PERFMON") and not has("CAP_SYS_ADMIN"):
        missing.append("CAP_PERFMON")
    if not has("CAP_NET_ADMIN"):
        missing.append("CAP_NET_ADMIN")
    return missing


def check_privileges() -> None:
    missing = missing_capabilities(effective_capabilities())
    if missing:
        who = "not root and " if os.geteuid() != 0 else ""
        raise EnvironmentProblem(
            f"{who}missing capabilities {', '.join(missing)}: run as root (sudo) or grant them "
            "(see docs/security.md)")


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


def ensure_tracefs() -> None:
    """Mounts tracefs (and debugfs, which older tools look through) when absent."""
    if _mounted(TRACEFS) and not os.access(TRACEFS, os.R_OK | os.X_OK,
                                                   effective_ids=True):
        raise EnvironmentProblem(
            f"tracefs at {TRACEFS} is not readable by uid {os.geteuid()}: grant "
            "CAP_DAC_READ_SEARCH or run as root (see docs/security.md)")
    if (TRACEFS / "events").is_dir():
        return
    for fstype, target in (("tracefs", TRACEFS), ("debugfs", DEBUGFS)):
        if _mounted(target):
            continue
        result = subprocess.run(["mount", "-t", fstype, "nodev", str(target)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            log.info("mounted", extra={"fs": fstype, "at": str(target)})
        elif fstype == "tracefs":
            raise EnvironmentProblem(
                f"tracefs is not mounted and mounting it at {target} failed: "
                f"{result.stderr.strip() or 'mount returned ' + str(result.returncode)}")
    if not (TRACEFS / "events").is_dir():
        raise EnvironmentProblem(f"tracefs at {TRACEFS} has no events directory")


def _has_kconfig(directory: Path) -> bool:
    return (directory / KCONFIG).is_file()


def _merge_tree(build: Path, common: Path, target: Path) -> None:
    """One tree of symlinks holding both halves of Debian's split headers: bcc compiles in a
    single directory, and the -amd64 half includes the -common one only through its Makefile."""
    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in build.iterdir()} | {p.name for p in common.iterdir()}
    for name in sorted(names):
        in_build, in_common, link = build / name, common / name, target / name
        if in_build.is_dir() and in_common.is_dir() and not in_build.is_symlink():
            _merge_tree(in_build, in_common, link)
            continue
        source = in_build if in_build.exists() else in_common
        if not link.is_symlink():
            link.symlink_to(source)


def _debian_header_pairs(src: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for build in sorted(src.glob("linux-headers-*"), reverse=True):
        if build.name.endswith("-common") or not (build / "Makefile").exists():
            continue
        version = build.name.removeprefix("linux-headers-")
        flavourless = version.rsplit("-", 1)[0]
        common = src / f"linux-headers-{flavourless}-common"
        if common.is_dir():
            pairs.append((build, common))
    return pairs


def ensure_headers(src: Path = Path("/usr/src")) -> str:
    """Makes kernel headers visible to bcc; returns where they are."""
    override = os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        if not _has_kconfig(Path(override)):
            raise EnvironmentProblem(
                f"BCC_KERNEL_SOURCE={override} holds no kernel headers ({KCONFIG} is missing)")
        return override
    modules = Path("/lib/modules") / platform.release()
    if (modules / "build").is_dir() and (
            _has_kconfig(modules / "build") or _has_kconfig(modules / "source")):
        return str(modules / "build")
    pairs = _debian_header_pairs(src)
    if not pairs:
        raise EnvironmentProblem(
            f"no kernel headers for {platform.release()}: install linux-headers (make setup "
            "does), or set BCC_KERNEL_SOURCE to a kernel header tree")
    build, common = pairs[0]
    target = MERGED_HEADERS / build.name
    if not _has_kconfig(target):
        _merge_tree(build, common, target)
    os.environ["BCC_KERNEL_SOURCE"] = str(target)
    log.info("using kernel headers merged from /usr/src",
             extra={"headers": build.name, "at": str(target)})
    return str(target)


def prepare() -> None:
    check_privileges()
    ensure_tracefs()
    ensure_headers()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
