"""Transfer: a network pre-trained elsewhere, imported, then applied and fine-tuned on a small cohort.

    python benchmarks/transfer.py --work /tmp/transfer [--large 400] [--small 32] [--threads 2]

One command, the experiment of docs/benchmarks.md *Transfer*:

1. **Elsewhere**: a large simulated cohort (``pipeline.demo``, another seed, another simulation
   grid: 2 mm instead of 1.5, so other scanner draws and smoother images), prepared the way a
   biobank hands out its images, not by this pipeline: each image resampled onto the same 4 mm
   template grid through its true (simulated) pose, Gaussian anti-aliasing, no N4, z-scored inside
   the template brain mask; and an SFCN pre-trained on it by a loop written the way its authors
   train it (Peng et al. 2021: 40 soft-label age bins, KL divergence to a Gaussian around the true
   age), saved in their published layout (``nn.DataParallel`` state dict, ``module.`` keys, a
   ``.p`` file) with the reference output of one image.
2. **Import** as a user would: ``bids-deepstudy import … --architecture sfcn_peng --output bins``,
   timed, with its parity check against that reference output.
3. **A small cohort** (another seed, the demo's default settings) preprocessed by the same
   workflow, split into ``--outer`` folds by age rank (default 4: each participant tested once; the
   training part keeps every sixth participant by age for validation); the same splits for every
   model: SFCN trained from scratch (``pipeline.learning.train``'s defaults, ``model: sfcn_peng`` with the
   imported widths), the study's default ``simple_cnn`` from scratch, the imported package applied
   without training (``apply``'s predict stage), fine-tuned with ``train.init_from`` (the package's
   40 age bins kept, ``train.package_head: keep``, the study training their expected value; head
   only: ``freeze: [feature_extractor]``, whose BatchNorm layers then normalise with the package's
   statistics; all layers: ``backbone_lr_factor: 0.1``; and a new one-output head first fitted
   as a linear probe of the pre-trained features, ``package_head: new``, ``head_init: probe``),
   and the linear baseline (``pipeline.results.linear``).

Prints the Markdown tables: test MAE per model over all participants (each participant's images
averaged) with its 95 % bootstrap interval over participants, and every model against each model
trained from scratch, paired (``pipeline.results.compare``: each draw scores both on the same
participants). ``--work`` keeps every step's output, and a rerun reuses what is there. On 2 shared
cores about an hour: preprocessing the small cohort, pre-training (most of it), and 16 short trainings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from import_parity import AuthorsSFCN  # noqa: E402  (the authors' layout, re-typed)

WIDTHS = [16, 32, 64, 128, 128, 32]  # half the paper's widths: a 40x48x40 grid at 4 mm, 2 shared cores
BIN_RANGE = (20.0, 80.0, 1.5)  # the demo's ages (20-80): 40 bins of 1.5 years, as SFCN's 40 bins of 1 year
OUTER = 4
SFCN = {"model": "sfcn_peng", "model_args": {"channels": WIDTHS}}
INIT = "elsewhere/sfcn-brainage:1"
MODELS = {  # name: training settings over pipeline.learning.train's defaults (None: not trained here)
    "SFCN from scratch": SFCN,
    "simple_cnn from scratch (the study default)": {},
    "imported, applied without training": None,
    # the package's 40 age bins kept (package_head: keep): the study trains their expected value
    "fine-tuned, head only": {**SFCN, "init_from": INIT, "freeze": ["feature_extractor"]},
    "fine-tuned, all layers (backbone lr x0.1)": {**SFCN, "init_from": INIT, "backbone_lr_factor": 0.1},
    # the bins replaced by one output, started as the linear probe of the pre-trained features (head_init: probe)
    "fine-tuned, new head only (package_head new)": {**SFCN, "init_from": INIT, "freeze": ["feature_extractor"],
                                                     "package_head": "new"},
    "linear baseline": None,
}


def run(command: list[str], **kwargs) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, check=True, env=env, **kwargs)


def cohort(work: Path, name: str, n: int, seed: int, extra: list[str]) -> Path:
    """Generate a demo cohort and preprocess it with the workflow (the demo's config): its results folder."""
    data, results = work / name, work / f"results-{name}"
    if not (data / "participants.tsv").exists():
        run([sys.executable, "-m", "pipeline.demo", str(data), "--n-subjects", str(n), "--seed", str(seed),
             "--overwrite", *extra])
    override = work / f"config-{name}.json"  # JSON is YAML
    override.write_text(json.dumps({"bids_dir": str(data), "results_dir": str(results), "target": "age",
                                    "task": "regression", "explain": {"groundtruth": None}}))
    run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2",
         "--configfile", str(REPO / "config" / "config.yaml"), str(override), "-q", "--rerun-incomplete", "--",
         str(results / "splits.tsv")],
        cwd=work)
    return results


def elsewhere(data: Path, grid: Path, out: Path) -> pd.DataFrame:
    """The other lab's arrays: every image of the cohort ``data`` on the template grid of ``grid``
    through its true pose (the demo's ground truth), anti-aliased, z-scored in the brain mask."""
    import nibabel as nib
    from scipy import ndimage

    from pipeline.intake.preprocess import normalise

    table = out / "images.tsv"
    if table.exists():
        return pd.read_csv(table, sep="\t")
    template = nib.load(next(grid.glob("*_T1w.nii.gz")))
    mask = np.asarray(nib.load(next(grid.glob("*desc-brain_mask.nii.gz"))).dataobj)
    spacing = float(template.header.get_zooms()[0])
    ages = pd.read_csv(data / "participants.tsv", sep="\t").set_index("participant_id")["age"]
    rows = []
    (out / "arrays").mkdir(parents=True, exist_ok=True)
    for path in sorted(data.glob("sub-*/**/anat/*_T1w.nii*")):
        image_id = path.name.split("_T1w")[0]
        pose = sorted((data / "derivatives" / "groundtruth").glob(f"sub-*/**/anat/{image_id}_from-*_pose.json"))[0]
        native = nib.load(path)
        voxel = np.asarray(native.header.get_zooms()[:3], float)
        sigma = np.sqrt(np.clip(spacing ** 2 - voxel ** 2, 0, None)) / (2 * np.sqrt(2 * np.log(2))) / voxel
        smooth = ndimage.gaussian_filter(np.asarray(native.dataobj, np.float32), sigma)
        to_native = np.linalg.inv(native.affine) @ np.array(json.loads(pose.read_text())["matrix"]) @ template.affine
        on_grid = ndimage.affine_transform(smooth, to_native[:3, :3], to_native[:3, 3], output_shape=mask.shape, order=1)
        array = out / "arrays" / f"{image_id}.npy"
        np.save(array, normalise(on_grid, mask, path)[None])
        participant = image_id.split("_")[0]
        rows.append({"participant_id": participant, "image_id": image_id, "array": str(array),
                     "age": float(ages[participant])})
    result = pd.DataFrame(rows)
    result.to_csv(table, sep="\t", index=False)
    return result


def images(results: Path) -> pd.DataFrame:
    """Every preprocessed image of a cohort: participant, session, image id, array path, age."""
    from pipeline.intake.study import study_table

    table = study_table(results / "samples.tsv", results / "splits.tsv", results / "derivatives" / "pipeline",
                        "fold-1", ["T1w"])
    return table.drop(columns="split")


def outer_splits(table: pd.DataFrame, k: int = OUTER) -> list[pd.DataFrame]:
    """``k`` copies of ``table`` with a ``split`` column: participants ranked by age (ties by id), the
    i-th tested in split i mod k; of the others every sixth by age validates, the rest train."""
    people = table.groupby("participant_id", as_index=False)["age"].first().sort_values(["age", "participant_id"])
    people["outer"] = np.arange(len(people)) % k
    designs = []
    for fold in range(k):
        rest = people[people["outer"] != fold].reset_index(drop=True)
        split = {p: "test" for p in people.loc[people["outer"] == fold, "participant_id"]}
        split.update({p: "val" if i % 6 == 3 else "train" for i, p in enumerate(rest["participant_id"])})
        designs.append(table.assign(split=table["participant_id"].map(split)))
    return designs


def soft_labels(ages: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """Peng et al.'s soft labels: a Gaussian around each age over the bin centres, summing to 1."""
    weights = torch.exp(-0.5 * ((centres[None] - ages[:, None]) / sigma) ** 2)
    return weights / weights.sum(1, keepdim=True)


def log_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, bins): the authors' module returns [log-probabilities shaped (B, K, 1, 1, 1)]."""
    return model(x)[0].flatten(1)


def pretrain(table: pd.DataFrame, out: Path, epochs: int, seed: int = 0) -> dict:
    """The other lab's training loop: SFCN, 40 soft-label bins, KL divergence, Adam; the best
    validation MAE's weights saved as its authors save theirs (DataParallel state dict)."""
    checkpoint = out / "run_transfer_epoch_best_mae.p"
    record = out / "pretrain.json"
    if record.exists():
        return json.loads(record.read_text())
    torch.manual_seed(seed)
    people = sorted(table["participant_id"].unique())
    val_ids = set(people[::10])
    x = torch.from_numpy(np.stack([np.load(p) for p in table["array"]]).astype(np.float32))
    y = torch.tensor(table["age"].to_numpy(float), dtype=torch.float32)
    is_val = torch.tensor(table["participant_id"].isin(val_ids).to_numpy())
    start, stop, step = BIN_RANGE
    centres = torch.arange(start + step / 2, stop, step)
    model = AuthorsSFCN(WIDTHS, output_dim=len(centres), avg_shape=(1, 1, 1))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    train_idx, val_idx = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    best, clock, history = (float("inf"), 0), time.perf_counter(), []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(train_idx)).split(8):
            index = train_idx[batch]
            loss = F.kl_div(log_probabilities(model, x[index]), soft_labels(y[index], centres, step), reduction="batchmean")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([(log_probabilities(model, x[i]).exp() * centres).sum(1) for i in val_idx.split(32)])
        mae = float((predicted - y[val_idx]).abs().mean())
        history.append(round(mae, 3))
        print(f"pre-training epoch {epoch}: validation MAE {mae:.2f}", file=sys.stderr, flush=True)
        if mae < best[0]:
            best = (mae, epoch)
            torch.save(nn.DataParallel(model).state_dict(), checkpoint)
    info = {"checkpoint": str(checkpoint), "images": len(table), "participants": len(people),
            "validation_participants": len(val_ids), "best_validation_mae": best[0], "best_epoch": best[1],
            "epochs": epochs, "minutes": (time.perf_counter() - clock) / 60, "history": history}
    record.write_text(json.dumps(info, indent=2))
    return info


def import_checkpoint(info: dict, reference: Path, out: Path) -> dict:
    """``bids-deepstudy import`` as a user runs it, with the authors' module's output on ``reference``."""
    package = out / "package"
    if (package / "spec.json").exists():
        return json.loads((out / "import.json").read_text())
    start, stop, step = BIN_RANGE
    model = AuthorsSFCN(WIDTHS, output_dim=40, avg_shape=(1, 1, 1))
    state = torch.load(info["checkpoint"], weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    x = np.load(reference).astype(np.float32)
    with torch.no_grad():
        y = model.eval()(torch.from_numpy(x[None]))[0].numpy()  # as their code returns it
    np.save(out / "reference_input.npy", x)
    np.save(out / "reference_output.npy", y)
    clock = time.perf_counter()
    run([sys.executable, "-m", "pipeline.sharing.importer", info["checkpoint"], "--out", str(package),
         "--architecture", "sfcn_peng", "--arch-args", json.dumps({"channels": WIDTHS}), "--voxel-size", "4",
         "--shape", "40", "48", "40", "--brain-extraction", "none", "--intensity", "zscore", "--output", "bins",
         "--bin-range", str(start), str(stop), str(step), "--target", "age", "--license", "CC0-1.0",
         "--reference-input", str(out / "reference_input.npy"), "--reference-output", str(out / "reference_output.npy")])
    spec = json.loads((package / "spec.json").read_text())
    result = {"seconds": time.perf_counter() - clock, "parity": spec["parity"]["max_abs_difference"],
              "onnx": spec.get("onnx", {}).get("max_abs_difference")}
    (out / "import.json").write_text(json.dumps(result, indent=2))
    return result


def study_recipe() -> dict:
    """The recipe of the demo config's preprocessing, as ``train.init_from`` compares it."""
    import yaml

    from pipeline.common.config import resolved
    from pipeline.intake import recipe

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return recipe.compared(recipe.from_config(resolved(["preprocess"], config["preprocess"]), config["channels"],
                                              config["bids_filters"]))


def deep(design: pd.DataFrame, hyper: dict, package: Path, out: Path, fold: int, threads: int) -> pd.DataFrame:
    """Train on the design's train/val rows (from the package when ``init_from`` is set); test predictions."""
    from pipeline.learning.saved import load_model
    from pipeline.learning.settings import TrainSettings
    from pipeline.learning.train import train
    from pipeline.results.evaluate import predict

    if not (out / "model.pt").exists():
        init = {"package": package, "recipe": study_recipe(), "fold": "fold-1"} if hyper.get("init_from") else None
        train(design, "age", "regression", TrainSettings.of(hyper), out, threads=threads, channels=["T1w"], init=init)
    model, coder, _ = load_model(out / "model.pt")
    return predict(model, coder, design[design["split"] == "test"], "age").drop(columns="split")


def applied(design: pd.DataFrame, package: Path, out: Path) -> pd.DataFrame:
    from pipeline.common import package as packages
    from pipeline.sharing.predict import predict_folds

    test = design[design["split"] == "test"].reset_index(drop=True)
    predictions = predict_folds(packages.load(package), test, out, out / "predictions.tsv")
    return predictions.drop(columns=[c for c in ("true",) if c in predictions]).merge(
        test[["image_id", "age"]].rename(columns={"age": "true"}), on="image_id", validate="one_to_one")


def linear(design: pd.DataFrame, results: Path, out: Path) -> pd.DataFrame:
    import nibabel as nib

    from pipeline.common.tables import read_tsv
    from pipeline.results import linear as baseline

    mask = np.asarray(nib.load(next((results / "grid").glob("*desc-brain_mask.nii.gz"))).dataobj) > 0
    if not (out / "predictions.tsv").exists():
        baseline.run(design, "outer", "age", "regression", mask, out)
    test = read_tsv(out / "predictions.tsv")
    return test[test["split"] == "test"].drop(columns="split")


def per_participant(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per participant: the mean prediction over its images."""
    return predictions.groupby("participant_id", as_index=False).agg(true=("true", "first"),
                                                                      predicted=("predicted", "mean"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (kept; a rerun reuses it)")
    parser.add_argument("--large", type=int, default=400, help="participants of the pre-training cohort")
    parser.add_argument("--small", type=int, default=32, help="participants of the small cohort")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--outer", type=int, default=OUTER, help="outer folds of the small cohort")
    parser.add_argument("--epochs", type=int, help="override train.epochs of the small-cohort models (smoke runs)")
    args = parser.parse_args(argv)
    from pipeline.results.compare import compare
    from pipeline.results.metrics import with_intervals

    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    small = cohort(work, "small", args.small, 7, [])
    large = work / "large"
    if not (large / "participants.tsv").exists():
        run([sys.executable, "-m", "pipeline.demo", str(large), "--n-subjects", str(args.large), "--seed", "100",
             "--sim-resolution", "2", "--overwrite"])
    info = pretrain(elsewhere(large, small / "grid", work / "elsewhere"), work, args.pretrain_epochs)
    small_images = images(small)
    imported = import_checkpoint(info, Path(small_images["array"].iloc[0]), work)
    package = work / "package"
    designs = outer_splits(small_images, args.outer)
    results = {}
    for name, hyper in MODELS.items():
        tests = []
        for k, design in enumerate(designs, start=1):
            out = work / "models" / name.split(" (")[0].replace(" ", "-").replace(",", "") / f"outer-{k}"
            out.mkdir(parents=True, exist_ok=True)
            if name.startswith("linear"):
                tests.append(linear(design, small, out))
            elif hyper is None:
                tests.append(applied(design, package, out))
            else:
                epochs = {"epochs": args.epochs} if args.epochs else {}
                tests.append(deep(design, {**hyper, **epochs, "seed": 0}, package, out, k, args.threads))
        results[name] = per_participant(pd.concat(tests, ignore_index=True))
        print(f"{name}: MAE {(results[name]['true'] - results[name]['predicted']).abs().mean():.3f}",
              file=sys.stderr, flush=True)
    train_mean = float(small_images.groupby("participant_id")["age"].first().mean())
    print(f"\nPre-training: {info['participants']} participants ({info['images']} images), validation MAE "
          f"{info['best_validation_mae']:.2f} at epoch {info['best_epoch']} of {info['epochs']}, "
          f"{info['minutes']:.1f} min. Import: {imported['seconds']:.1f} s, parity {imported['parity']:.1e}, "
          f"ONNX {imported['onnx']}.\n")
    print(f"Small cohort: {args.small} participants, {args.outer} outer folds, each participant tested once.\n")
    print("| model | test MAE (years) [95 % CI] | × SFCN from scratch | × simple_cnn from scratch |")
    print("|:--|--:|--:|--:|")
    mae = {name: float((p["true"] - p["predicted"]).abs().mean()) for name, p in results.items()}
    for name, predictions in results.items():
        m = with_intervals(predictions, None, train_mean)
        print(f"| {name} | {m['mae']:.2f} [{m['mae_ci'][0]:.2f}, {m['mae_ci'][1]:.2f}] | "
              f"{m['mae'] / mae['SFCN from scratch']:.2f} | {m['mae'] / mae['simple_cnn from scratch (the study default)']:.2f} |")
    for reference in ("SFCN from scratch", "simple_cnn from scratch (the study default)"):
        print(f"\n| against {reference} | MAE difference [95 % CI, paired] | verdict |")
        print("|:--|--:|:--|")
        for name in MODELS:
            if name != reference:
                row = compare(results[name], results[reference], "regression", None, train_mean).set_index("metric").loc["mae"]
                verdict = row["verdict"].replace("deep", "this").replace("linear", "the reference")
                print(f"| {name} | {row['difference']:+.2f} [{row['difference_ci_low']:+.2f}, "
                      f"{row['difference_ci_high']:+.2f}] | {verdict} |")

if __name__ == "__main__":
    main()
