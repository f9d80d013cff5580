"""Output equivalence of two commits: the session's small study (tests/smallstudy.py: 10 demo
participants, two folds, occlusion and gradient maps, the model package) run from a `git archive`
copy of each commit, and every result file compared by hash.

A refactor that is meant to change no output must leave every compared file identical. Masked
before hashing: the run's own folder (absolute paths in tables, sidecars and the report), ISO
timestamps (the report, the model card, ``*.json`` records) and the training history's wall-time
columns (``seconds``, ``data_wait``). Not compared: logs, benchmarks, Snakemake's state, ingest's
cache (keyed by the dataset's file times), TensorBoard and checkpoint files (they hold times and
run ids), and the package archive (its members are compared unpacked, under ``package/model``).

    python benchmarks/equivalence.py BEFORE AFTER [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPARED = (".nii.gz", ".tsv", ".json", ".png", ".html", ".npy", ".md", ".onnx", ".safetensors", ".sha256", ".txt")
SKIPPED = ("logs/", "benchmarks/", "checkpoints/", "/tensorboard/", "ingest_cache/", "model.tar.gz")
TIMINGS = ("seconds", "data_wait")  # history.tsv's wall-time columns
TIMESTAMP = re.compile(rb"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:?\d{2}|Z)?")


def checkout(commit: str, dest: Path) -> Path:
    """The tree of ``commit`` (``git archive``) in ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_study(tree: Path, root: Path) -> Path:
    """The small study of ``tree``'s tests/smallstudy.py, run with ``tree``'s package, in ``root``."""
    code = "import sys; from pathlib import Path; import smallstudy; smallstudy.build(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree / 'tests'}"}
    subprocess.run([sys.executable, "-c", code, str(root)], env=env, check=True, cwd=tree)
    return root / "study"


def digests(study: Path) -> dict[str, str]:
    """sha256 of every compared file under ``study`` (its folder and timestamps masked)."""
    out = {}
    for path in sorted(study.rglob("*")):
        rel = str(path.relative_to(study))
        if not path.is_file() or rel.startswith(".") or any(s in f"/{rel}" for s in SKIPPED):
            continue
        if not rel.endswith(COMPARED):
            continue
        data = path.read_bytes()
        if rel.endswith("history.tsv"):
            data = without_timings(data)
        if rel.endswith((".tsv", ".json", ".html", ".md", ".txt", ".sha256")):
            data = data.replace(b"<wbr>", b"")  # the report's breakable paths
            data = TIMESTAMP.sub(b"<time>", data.replace(str(study.parent).encode(), b"<root>"))
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def without_timings(table: bytes) -> bytes:
    """A TSV without its wall-time columns."""
    rows = [line.split(b"\t") for line in table.splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name.decode() not in TIMINGS]
    return b"\n".join(b"\t".join(row[i] for i in keep) for row in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--work", type=Path, help="where the two runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="equivalence-"))
    found = {}
    for label, commit in (("before", args.before), ("after", args.after)):
        tree = checkout(commit, work / label / "tree")
        found[label] = digests(run_study(tree, work / label / "run"))
    names = sorted(set(found["before"]) | set(found["after"]))
    differ = [n for n in names if found["before"].get(n) != found["after"].get(n)]
    for name in differ:
        state = "only before" if name not in found["after"] else "only after" if name not in found["before"] else "differs"
        print(f"{state}\t{name}")
    print(f"{len(names) - len(differ)} of {len(names)} files identical ({args.before} → {args.after}; runs in {work})")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
