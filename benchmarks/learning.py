"""Deep model against the linear baseline, and what each change of the training recipe bought.

    python benchmarks/learning.py --cohort demo    # 64 participants, age regression, 2 folds
    python benchmarks/learning.py --cohort lesion  # 40 participants, 1 cm deep-grey-matter lesion, 4 folds
    python benchmarks/learning.py --cohort demo --seeds 0 1 2  # today's recipe again with other seeds
    python benchmarks/learning.py --cohort lesion --recipes 1 6  # only the first and the last recipe

Generates the cohort (``pipeline.demo``; the lesion cohort with ``--lesion-site deep-gm
--lesion-radius 5 --lesion-contrast 0.25 0.40 --lesion-jitter 3``), preprocesses it twice with
the real workflow (``preprocess.antialias`` false and true, the study's 4 mm grid), then trains,
per recipe, every fold's network with ``pipeline.learning.train`` and predicts the test images with
``pipeline.results.evaluate.predict``, and fits the linear baseline (``pipeline.results.linear``) per fold. The
recipes go from the defaults before this change to today's, one change at a time. Prints a
Markdown table: per fold and for the ensemble of folds, the deep model's and the linear model's
test MAE (regression) or ROC AUC (classification), the ensemble's 95 % bootstrap interval over
participants and the minutes of training. ``--seeds``: today's recipe is trained again with each
further training seed (its row per seed), to show the spread between seeds. Takes about an hour
per cohort on 2 cores.
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
OLD_AUGMENTATION = {"rotation": 5, "scaling": 0.05, "translation": 2, "noise": 0.05, "intensity": 0.1}
NO_AUGMENTATION = {k: 0 for k in OLD_AUGMENTATION}
OLD = {"epochs": 40, "batch_size": 4, "learning_rate": 0.003, "weight_decay": 1e-4, "patience": 15, "ema": 0,
       "augmentation": OLD_AUGMENTATION, "model_args": {"norm": "instance", "dropout": 0.2}}
LONGER = {**OLD, "augmentation": NO_AUGMENTATION, "model_args": {"norm": "batch", "dropout": 0},
          "learning_rate": 0.001, "epochs": 100, "patience": 30}
# (name, preprocessing anti-aliased?, training settings): each row changes one thing of the row before.
RECIPES = [
    ("before: instance norm, dropout 0.2, augmentation, lr 0.003, 40 epochs", False, OLD),
    ("+ anti-aliased resampling", True, OLD),
    ("+ no augmentation", True, {**OLD, "augmentation": NO_AUGMENTATION}),
    ("+ batch norm, no dropout", True, {**OLD, "augmentation": NO_AUGMENTATION,
                                        "model_args": {"norm": "batch", "dropout": 0}}),
    ("+ lr 0.001, 100 epochs, patience 30", True, LONGER),
    ("+ weight decay 0.01, weight EMA 0.98 (today's defaults)", True, {}),
]
COHORTS = {
    "demo": {"n": 64, "seed": 0, "lesion": [], "target": "age", "task": "regression", "folds": 2},
    "lesion": {"n": 40, "seed": 1, "target": "group", "task": "classification", "folds": 4,
               "lesion": ["--lesion-site", "deep-gm", "--lesion-radius", "5", "--lesion-contrast", "0.25", "0.40",
                          "--lesion-jitter", "3"]},
}


def prepare(work: Path, cohort: dict) -> dict[bool, Path]:
    """The cohort and its preprocessing without and with anti-aliasing: {antialias: results folder}."""
    data = work / "data"
    if not (data / "participants.tsv").exists():
        subprocess.run([sys.executable, "-m", "pipeline.demo", str(data), "--n-subjects", str(cohort["n"]),
                        "--seed", str(cohort["seed"]), "--overwrite", *cohort["lesion"]], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    folders = {}
    for antialias in (False, True):
        results = work / f"results-antialias-{str(antialias).lower()}"
        override = work / f"config-antialias-{str(antialias).lower()}.json"  # JSON is YAML
        override.write_text(json.dumps({"bids_dir": str(data), "results_dir": str(results),
                                        "target": cohort["target"], "task": cohort["task"],
                                        "preprocess": {"antialias": antialias, "brain_extraction": "none"},
                                        # the design these figures were measured with (docs/benchmarks.md)
                                        "split": {"folds": cohort["folds"], "method": "stratified"},
                                        "explain": {"groundtruth": None}}))
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2",
                        "--configfile", str(REPO / "config" / "config.yaml"), str(override), "-q", "--",
                        str(results / "splits.tsv")], check=True, cwd=work, env=env)
        folders[antialias] = results
    return folders


def score(predictions, task: str, classes):
    from pipeline.results.metrics import with_intervals

    metrics = with_intervals(predictions, classes, float(predictions["true"].mean()) if not classes else None)
    name = "roc_auc" if classes else "mae"
    return metrics[name], metrics[f"{name}_ci"]


def deep_row(results: Path, cohort: dict, hyper: dict, classes, work: Path) -> tuple[list, tuple, float]:
    """Each fold's test metric, the ensemble's (value, interval) and the training minutes."""
    import pandas as pd

    from pipeline.intake.study import study_table
    from pipeline.results.evaluate import ensemble, predict
    from pipeline.learning.saved import load_model
    from pipeline.learning.settings import TrainSettings
    from pipeline.learning.train import train

    folds, tests, start = [], [], time.perf_counter()
    for k in range(1, cohort["folds"] + 1):
        table = study_table(results / "samples.tsv", results / "splits.tsv", results / "derivatives" / "pipeline",
                            f"fold-{k}", ["T1w"])
        out = Path(tempfile.mkdtemp(dir=work))
        train(table, cohort["target"], cohort["task"], TrainSettings.of(hyper), out, threads=2, classes=classes)
        model, coder, _ = load_model(out / "model.pt")
        test = predict(model, coder, table[table["split"] == "test"], cohort["target"]).drop(columns="split")
        folds.append(score(test, cohort["task"], classes)[0])
        tests.append(test)
    combined = ensemble(tests, classes) if classes else pd.concat(tests).groupby(
        ["participant_id", "session", "image_id", "true"], dropna=False)["predicted"].mean().reset_index()
    return folds, score(combined, cohort["task"], classes), (time.perf_counter() - start) / 60


def linear_row(results: Path, cohort: dict, classes, work: Path) -> tuple[list, tuple]:
    import nibabel as nib
    import numpy as np

    from pipeline.results import linear
    from pipeline.common.tables import read_tsv
    from pipeline.intake.study import study_table
    from pipeline.results.evaluate import ensemble

    mask = np.asarray(nib.load(next((results / "grid").glob("*desc-brain_mask.nii.gz"))).dataobj) > 0
    folds, tests = [], []
    for k in range(1, cohort["folds"] + 1):
        table = study_table(results / "samples.tsv", results / "splits.tsv", results / "derivatives" / "pipeline",
                            f"fold-{k}", ["T1w"])
        out = Path(tempfile.mkdtemp(dir=work))
        linear.run(table, f"fold-{k}", cohort["target"], cohort["task"], mask, out, classes)
        test = read_tsv(out / "predictions.tsv")
        test = test[test["split"] == "test"].drop(columns="split").astype({"true": str} if classes else {})
        folds.append(score(test, cohort["task"], classes)[0])
        tests.append(test)
    return folds, score(ensemble(tests, classes), cohort["task"], classes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", choices=sorted(COHORTS), required=True)
    parser.add_argument("--work", type=Path, help="working folder (kept; default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of today's recipe")
    parser.add_argument("--recipes", type=int, nargs="+", help="only these rows of RECIPES (1 = before, "
                        f"{len(RECIPES)} = today's); default all")
    args = parser.parse_args(argv)
    cohort = COHORTS[args.cohort]
    work = args.work or Path(tempfile.mkdtemp(prefix=f"learning-{args.cohort}-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = prepare(work, cohort)
    classes = json.loads((folders[True] / "targets.json").read_text()).get("classes")
    metric = "ROC AUC" if classes else "MAE"
    fold_names = [f"fold-{k}" for k in range(1, cohort["folds"] + 1)]
    print(f"\n{args.cohort}: {cohort['n']} participants, {cohort['task']} of {cohort['target']}, "
          f"{cohort['folds']} folds, test {metric}\n")
    print(f"| recipe | model | {' | '.join(fold_names)} | ensemble [95 % CI] | training min |")
    print("|---|---|" + "---|" * len(fold_names) + "---|---|")
    for antialias in (False, True):
        folds, (value, ci) = linear_row(folders[antialias], cohort, classes, work)
        label = "anti-aliased" if antialias else "plain"
        print(f"| {label} resampling | linear | " + " | ".join(f"{v:.3f}" for v in folds)
              + f" | {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | |", flush=True)
    chosen = [RECIPES[i - 1] for i in args.recipes] if args.recipes else RECIPES
    recipes = chosen + [(f"today's defaults, training seed {seed}", True, {"seed": seed})
                         for seed in args.seeds if seed != 0]
    for name, antialias, hyper in recipes:
        folds, (value, ci), minutes = deep_row(folders[antialias], cohort, hyper, classes, work)
        print(f"| {name} | deep | " + " | ".join(f"{v:.3f}" for v in folds)
              + f" | {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
