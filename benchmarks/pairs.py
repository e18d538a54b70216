"""The windows of part 2 and 5 as records in benchmarks/pairs/, so that runs can be pooled.

On this machine one hour's noise can leave the TCP interval straddling its target however many
pairs that hour gives (benchmarks/notes.md). Each pair is a ratio of two windows half a second
apart, so the hour's speed cancels within it, and pairs of several runs of the same datapath
estimate the same ratio: pooled, their interval narrows as the square root of their number.

A record says which datapath it measured: the git trees of bpf/ and of the exporter's default
configuration, and the attach mode. Runs are pooled only with records of the same datapath; a
run from a tree with uncommitted changes there records none and is never pooled."""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.exporter_process import REPO

from .interleaved import Rounds
from .stats import Summary, paired_ratios, summarize

PAIRS_DIR = Path(__file__).with_name("pairs")
# what decides the per-packet work: the programs and the defaults they are compiled with
DATAPATH_PATHS = ("bpf", "exporter/default-config.yaml")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()


def tree_identity() -> str | None:
    """The programs and defaults of this tree, e.g. "bpf=1a2b3c4 config=5d6e7f8"; None when
    the tree has uncommitted changes there (or is no git checkout)."""
    try:
        if _git("status", "--porcelain", "--", *DATAPATH_PATHS):
            return None
        trees = [_git("rev-parse", "--short", f"HEAD:{path}") for path in DATAPATH_PATHS]
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"bpf={trees[0]} config={trees[1]}"


def datapath(attach: str) -> str | None:
    """What a run measured: this tree's identity and how the programs were attached."""
    tree = tree_identity()
    return None if tree is None else f"{tree} attach={attach}"


@dataclass(frozen=True)
class Record:
    date: str
    commit: str
    datapath: str | None
    window_seconds: float
    load: tuple[float, float, float]
    without: dict[str, list[float]]
    attached: dict[str, list[float]]

    def ratios(self, stream: str) -> list[float]:
        return paired_ratios(self.without.get(stream, []), self.attached.get(stream, []))


def record_of(rounds: Rounds, window: float, load: tuple[float, float, float]) -> Record:
    try:
        commit = _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Record(now, commit, datapath(rounds.attach), window, load,
                  {k: v for k, v in rounds.without.items() if v},
                  {k: v for k, v in rounds.attached.items() if v})


def save(record: Record, directory: Path = PAIRS_DIR) -> Path:
    """A new file named by the record's date (and a number, should two share it)."""
    directory.mkdir(exist_ok=True)
    stem = record.date.replace(":", "")
    for number in range(1000):
        path = directory / (f"{stem}.json" if number == 0 else f"{stem}-{number}.json")
        try:
            with path.open("x") as f:
                f.write(json.dumps(record.__dict__) + "\n")
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: 1000 runs saved as of {record.date}")


def load(paths: Iterable[Path]) -> list[Record]:
    records = []
    for path in sorted(paths):
        raw = json.loads(path.read_text())
        raw["load"] = tuple(raw["load"])
        records.append(Record(**raw))
    return records


def load_all(directory: Path = PAIRS_DIR) -> list[Record]:
    return load(directory.glob("*.json")) if directory.is_dir() else []


@dataclass(frozen=True)
class Pooled:
    stream: str
    datapath: str
    runs: list[Record]
    ratios: Summary


def pool(records: Sequence[Record], stream: str, datapath_id: str) -> Pooled | None:
    """The pairs of `stream` in every record of that datapath; None when there are none."""
    runs = [r for r in records if r.datapath == datapath_id and r.ratios(stream)]
    if not runs:
        return None
    return Pooled(stream, datapath_id, runs,
                  summarize([x for r in runs for x in r.ratios(stream)]))
