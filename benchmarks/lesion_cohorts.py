"""Small, unbalanced-by-chance classification cohorts (issue 26): does the default recipe learn a
focal lesion from 15 training participants per fold, and does every study finish?

    python benchmarks/lesion_cohorts.py                                   # 3 sites x 3 seeds (hours on 2 cores)
    python benchmarks/lesion_cohorts.py --sites thalamus --seeds 0        # one cohort, one seed
    python benchmarks/lesion_cohorts.py --sites thalamus --seeds 0 --study  # and the whole workflow once

Per lesion site (``--sites``: ``deep-gm`` (right putamen), ``thalamus`` (right), ``hippocampus``
(left)), generates a cohort with ``pipeline.demo``: 40 participants, half of them patients with a
lesion of nominal radius 5 mm (about 1 cm across; each patient's radius × uniform(0.8, 1.2)),
25–40 % darker at its core, its centre jittered ±3 mm per axis. Each cohort gets its own data
seed (``--data-seed`` + the site's index). The study is the default config with only the dataset,
``target: group``, ``task: classification`` and ``split.folds: 2`` changed (the default stable
design, 4 mm grid): the real workflow preprocesses it and writes ``splits.tsv`` and
``split_balance.tsv``; then, per training seed (``--seeds``, config ``train.seed``), every fold's
network is trained with ``pipeline.learning.train.train`` (the default recipe; ``--epochs`` and
``--patience`` shorten it for a quick look) and predicts the test images, and the linear baseline
(``pipeline.results.linear``) is fitted per fold once. ``--study`` also runs the whole workflow
(report and package included) for the first seed, to check that the study finishes.

Prints, per cohort, seed and fold, the test ROC AUC of the deep model and of the linear one, the
ensembles', the fold's training participants per class, the kept epoch and the diagnostics'
findings; and the issue's goals: the deep ensemble never more than 0.05 below the linear
ensemble, every fold ≥ 0.85 where the linear fold is, no failed study.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITES = ("deep-gm", "thalamus", "hippocampus")
LESION = ["--lesion-radius", "5", "--lesion-contrast", "0.25", "0.40", "--lesion-jitter", "3"]


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def config(data: Path, results: Path, folds: int) -> dict:
    """The default config with only the dataset, target, task and number of folds changed."""
    return {"bids_dir": str(data), "results_dir": str(results), "target": "group", "task": "classification",
            "split": {"folds": folds}}


CORES = 2  # --cores: the workflow's cores and training's threads


def snakemake(work: Path, override: dict, *targets: str) -> float:
    """Run the workflow on the default config plus ``override``; return the minutes it took."""
    path = work / "override.json"  # JSON is YAML
    path.write_text(json.dumps(override))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", str(CORES),
                    "--configfile", str(REPO / "config" / "config.yaml"), str(path), "-q", "--", *targets],
                   check=True, cwd=work, env=env())
    return (time.perf_counter() - start) / 60


def prepare(work: Path, site: str, seed: int, folds: int, reuse: bool = False) -> Path:
    """The cohort, preprocessed and split by the workflow: its results folder (``reuse``: as a
    previous run under ``work`` left it, without asking the workflow whether it is up to date)."""
    data, results = work / "data", work / "results"
    if reuse and (results / "splits.tsv").exists():
        return results
    if not (data / "participants.tsv").exists():
        subprocess.run([sys.executable, "-m", "pipeline.demo", str(data), "--n-subjects", "40", "--seed", str(seed),
                        "--overwrite", "--lesion-site", site, *LESION], check=True, env=env())
    minutes = snakemake(work, config(data, results, folds), str(results / "splits.tsv"))
    print(f"{site}: cohort preprocessed and split in {minutes:.1f} min", file=sys.stderr, flush=True)
    return results


def auc(predictions, classes) -> float:
    from pipeline.results.metrics import with_intervals

    return float(with_intervals(predictions, classes, None)["roc_auc"])


def per_class(table, split: str) -> str:
    people = table[table["split"] == split].drop_duplicates("participant_id")["group"].astype(str)
    return "/".join(f"{n}" for _, n in sorted(people.value_counts().items()))


def deep(results: Path, folds: int, seed: int, classes, work: Path, hyper: dict) -> list[dict]:
    """One row per fold (test AUC, training participants per class, kept epoch, findings) and the
    ensemble's, of the default recipe with training seed ``seed``."""
    from pipeline.intake.study import study_table
    from pipeline.learning.saved import load_model
    from pipeline.learning.settings import TrainSettings
    from pipeline.learning.train import train
    from pipeline.results import diagnostics
    from pipeline.results.evaluate import ensemble, predict

    rows, tests = [], []
    for k in range(1, folds + 1):
        table = study_table(results / "samples.tsv", results / "splits.tsv", results / "derivatives" / "pipeline",
                            f"fold-{k}", ["T1w"])
        out = Path(tempfile.mkdtemp(dir=work))
        start = time.perf_counter()
        settings = TrainSettings.of({**hyper, "seed": seed})
        best = train(table, "group", "classification", settings, out, threads=CORES, classes=classes)
        model, coder, _ = load_model(out / "model.pt")
        test = predict(model, coder, table[table["split"] == "test"], "group").drop(columns="split")
        tests.append(test)
        findings = json.loads((out / "diagnostics.json").read_text())["findings"]
        findings += diagnostics.predicted(test, "classification")
        history_len = sum(1 for _ in open(out / "history.tsv")) - 1
        rows.append({"fold": f"fold-{k}", "deep": auc(test, classes), "train": per_class(table, "train"),
                     "val": per_class(table, "val"), "kept": f"{best['epoch']}/{history_len}",
                     "findings": ", ".join(f["finding"] for f in findings) or "-",
                     "minutes": (time.perf_counter() - start) / 60})
    rows.append({"fold": "ensemble", "deep": auc(ensemble(tests, classes), classes), "train": "", "val": "",
                 "kept": "", "findings": "", "minutes": sum(r["minutes"] for r in rows)})
    return rows


def linear(results: Path, folds: int, classes, work: Path) -> list[float]:
    """The linear baseline's test AUC per fold and for its ensemble."""
    import nibabel as nib
    import numpy as np

    from pipeline.common.tables import read_tsv
    from pipeline.intake.study import study_table
    from pipeline.results import linear as baseline
    from pipeline.results.evaluate import ensemble

    mask = np.asarray(nib.load(next((results / "grid").glob("*desc-brain_mask.nii.gz"))).dataobj) > 0
    values, tests = [], []
    for k in range(1, folds + 1):
        table = study_table(results / "samples.tsv", results / "splits.tsv", results / "derivatives" / "pipeline",
                            f"fold-{k}", ["T1w"])
        out = Path(tempfile.mkdtemp(dir=work))
        baseline.run(table, f"fold-{k}", "group", "classification", mask, out, classes)
        test = read_tsv(out / "predictions.tsv")
        test = test[test["split"] == "test"].drop(columns="split").astype({"true": str})
        values.append(auc(test, classes))
        tests.append(test)
    return values + [auc(ensemble(tests, classes), classes)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", choices=SITES, default=list(SITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (train.seed)")
    parser.add_argument("--data-seed", type=int, default=11, help="the first cohort's pipeline.demo --seed")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="shorter training (default: the config's train.epochs)")
    parser.add_argument("--patience", type=int, help="(default: the config's train.patience)")
    parser.add_argument("--train", type=json.loads, default={}, metavar="JSON",
                        help='further train settings, e.g. \'{"ema": 0}\' (default: the config\'s)')
    parser.add_argument("--study", action="store_true", help="also run the whole workflow once per cohort")
    parser.add_argument("--work", type=Path, help="working folder (kept; default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="reuse a cohort's preprocessing and split under "
                        "--work as they are (code changes since do not rerun them)")
    parser.add_argument("--cores", type=int, default=2, help="workflow cores and training threads")
    args = parser.parse_args(argv)
    global CORES
    CORES = args.cores
    work = args.work or Path(tempfile.mkdtemp(prefix="lesion-cohorts-"))
    hyper = {**args.train, **{k: v for k, v in (("epochs", args.epochs), ("patience", args.patience)) if v is not None}}
    print("| cohort | seed | fold | train (control/patient) | val | deep ROC AUC | linear ROC AUC | kept epoch "
          "| findings | training min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures, goals = [], []
    for site in args.sites:
        cohort = work / site
        cohort.mkdir(parents=True, exist_ok=True)
        results = prepare(cohort, site, args.data_seed + SITES.index(site), args.folds, args.reuse)
        classes = json.loads((results / "targets.json").read_text()).get("classes")
        lin = linear(results, args.folds, classes, cohort)
        for seed in args.seeds:
            rows = deep(results, args.folds, seed, classes, cohort, hyper)
            for row, line in zip(rows, lin):
                print(f"| {site} | {seed} | {row['fold']} | {row['train']} | {row['val']} | {row['deep']:.3f} "
                      f"| {line:.3f} | {row['kept']} | {row['findings']} | {row['minutes']:.1f} |", flush=True)
                if row["fold"] == "ensemble":
                    goals.append((site, seed, "ensemble within 0.05 of linear", row["deep"] >= line - 0.05))
                elif line >= 0.85:
                    goals.append((site, seed, f"{row['fold']} >= 0.85 where linear is", row["deep"] >= 0.85))
        if args.study:
            try:
                minutes = snakemake(cohort, {**config(cohort / "data", results, args.folds),
                                             "train": {"seed": args.seeds[0], **hyper},
                                             "explain": {"groundtruth": str(cohort / "data" / "derivatives" / "groundtruth")}})
                print(f"{site}: whole study (report and package) finished in {minutes:.1f} min", file=sys.stderr)
            except subprocess.CalledProcessError as error:
                failures.append(f"{site}: {error}")
    met = sum(ok for *_, ok in goals)
    print(f"\ngoals met: {met} of {len(goals)}")
    for site, seed, goal, ok in goals:
        if not ok:
            print(f"  missed: {site} seed {seed}: {goal}")
    if args.study:
        print("studies failed: " + ("; ".join(failures) if failures else "none"))


if __name__ == "__main__":
    main()
