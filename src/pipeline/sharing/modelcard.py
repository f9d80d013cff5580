"""The model card of a package (Markdown): data summary without participant ids, performance,
preprocessing, intended use, limitations and the model's license."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from pipeline.common import config
from pipeline.intake.split import SPLITS

INTENDED_USE = ("Research use: predicting `{target}` ({task}) from {channels} brain MRI of adults like those in "
                "the training data, prepared with this package's preprocessing recipe. Not a medical device; "
                "not for diagnosis or treatment decisions about an individual.")
LIMITATIONS = [
    "Trained and tested on {participants} participants from one dataset; performance on other scanners, "
    "sites, protocols or populations is unknown until measured there.",
    "Inputs must be prepared exactly as in `preprocessing.json` (template, grid, registration, per-image "
    "z-scoring); other preprocessing gives meaningless outputs.",
    "The test metrics are estimates from a held-out set of {test} participants, with the bootstrap "
    "intervals in `metrics.json`; small test sets give wide intervals.",
]

UNSPECIFIED = "unspecified"  # config package.license's default: no license granted


@dataclass(frozen=True)
class PackageSettings:
    """Config ``package`` (keys and meanings: config/README.md): the card's intended use (None: the
    pipeline's own wording, ``INTENDED_USE``), limitations added to ``LIMITATIONS``, the model's license."""

    intended_use: str | None
    limitations: list[str]
    license: str

    @classmethod
    def of(cls, package: Mapping) -> "PackageSettings":
        """The settings of config ``package`` (a key it leaves out: the schema's default; an unknown
        key: an InputError naming it)."""
        return config.build(cls, ["package"], package)


def license_lines(model_license: str) -> list[str]:
    """The card's *License* section for config ``package.license``."""
    if model_license == UNSPECIFIED:
        return ["No license is granted for this model (config `package.license` was not set): it is derived from "
                "the study's data, whose terms may restrict sharing. Ask the study's authors before using or "
                "redistributing it. The `pipeline` code that trained it is MIT-licensed; that does not extend to "
                "the model."]
    return [f"This model (weights and documents of this package) is licensed under: {model_license}."]


def distribution(values: pd.Series, task: str) -> str:
    """``mean ± sd (min–max)`` of a numeric target, or class counts."""
    if task == "classification":
        return ", ".join(f"{k}: {v}" for k, v in values.astype(str).value_counts().sort_index().items())
    numbers = values.astype(float)
    return f"{numbers.mean():.1f} ± {numbers.std():.1f} ({numbers.min():g}–{numbers.max():g})"


def cohort(manifest: pd.DataFrame, splits: pd.DataFrame, target: str | None, task: str) -> pd.DataFrame:
    """Counts and target distribution per fold and split (no ids): columns fold, split,
    participants, images, target (none for ``target`` None: a segmentation's targets are label images)."""
    if target is None:
        return cohort(manifest.assign(target="label image"), splits, "target", "classification").drop(columns="target")
    table = manifest.merge(splits.drop(columns="participant_id"), on="image_id")
    rows = [{"fold": "all", "split": "all", "participants": table["participant_id"].nunique(), "images": len(table),
             target: distribution(table[target], task)}]
    folds = [c for c in splits.columns if c.startswith("fold-")]
    parts = [(fold, split) for fold in folds for split in SPLITS if split != "test"] + [(folds[0], "test")]
    for fold, split in parts:  # the test set is the same in every fold: one row
        part = table[table[fold] == split]
        rows.append({"fold": "every fold" if split == "test" else fold, "split": split,
                     "participants": part["participant_id"].nunique(), "images": len(part),
                     target: distribution(part[target], task) if len(part) else ""})
    return pd.DataFrame(rows)


SEGMENTATION_METRICS = ("dice_", "hd95_", "native_dice_", "native_hd95_")  # per label (mm for HD95); dice_mean


def metric_lines(metrics: dict, task: str) -> list[str]:
    """Headline test metrics of the ensemble with intervals, and the folds' mean ± sd."""
    names = {"classification": ["roc_auc", "balanced_accuracy", "accuracy", "f1"],
             "segmentation": sorted(k for k in metrics["test"]["ensemble"] if k.startswith(SEGMENTATION_METRICS)
                                    and not k.endswith("_ci"))}.get(
        task, ["mae", "corrected_mae", "rmse", "r2", "pearson_r", "baseline_mae"])
    ensemble, mean, sd = metrics["test"]["ensemble"], metrics["test"]["fold_mean"], metrics["test"]["fold_sd"]
    lines = ["| metric | ensemble (95 % interval) | folds, mean ± sd |", "|---|---|---|"]
    for name in names:
        if name in ensemble:
            ci = ensemble.get(f"{name}_ci")
            interval = f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""
            spread = f"{mean[name]:.3f} ± {sd.get(name, float('nan')):.3f}" if name in mean else ""
            lines.append(f"| {name} | {ensemble[name]:.3f}{interval} | {spread} |")
    return lines


def comparison_lines(metrics: dict) -> list[str]:
    """The ensemble against the linear baseline on the same test images (paired difference)."""
    rows = [r for r in metrics["test"].get("comparison", []) if r["model"] == "ensemble"]
    if not rows:
        return []
    model = metrics["test"].get("linear", {}).get("model", "linear")
    lines = ["", f"Against a linear baseline ({model} regression fitted per fold to the same preprocessed images "
             "and splits, its ensemble over folds), on the same test images; difference = deep − linear with "
             "its 95 % bootstrap interval over participants:", "",
             "| metric | deep | linear | difference (95 % interval) | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['deep']:.3f} | {r['linear']:.3f} | {r['difference']:+.3f} "
                     f"({r['difference_ci_low']:+.3f} to {r['difference_ci_high']:+.3f}) | {r['verdict']} |")
    return lines


def render(spec: dict, recipe: dict, metrics: dict, counts: pd.DataFrame, card: PackageSettings) -> str:
    """The card's Markdown. ``card`` is config ``package``."""
    task, target, channels = spec["task"], spec["target"], spec["input"]["channels"]
    segmentation = task == "segmentation"
    if segmentation:  # the label names, index = label value
        target = "label maps (" + ", ".join(f"{k} {name}" for k, name in enumerate(spec["classes"])) + ")"
    everyone = counts.iloc[0]
    test = counts[counts["split"] == "test"].iloc[0]
    words = {"target": target, "task": task, "channels": " + ".join(channels),
             "participants": everyone["participants"], "test": test["participants"]}
    use = card.intended_use or INTENDED_USE.format(**words)
    limits = [line.format(**words) for line in LIMITATIONS] + list(card.limitations)
    arch = spec["architecture"]
    validation = metrics["validation"]
    lines = [
        f"# Model card: {task} of {target}" if segmentation else f"# Model card: {task} of `{target}`", "",
        f"An ensemble of {len(spec['folds'])} `{arch['name']}` networks (one per cross-validation fold; "
        f"arguments {arch['args'] or 'default'}), trained with the `pipeline` package. The package predicts "
        f"with the {spec['ensemble']}.", "",
        "## Intended use", "", use, "",
        "## Data", "",
        f"{everyone['participants']} participants, {everyone['images']} images; "
        + (f"targets: each image's label image, {target}. Counts per split (no participant ids):" if segmentation
           else f"target `{target}`: {everyone[target]}. Counts and target distribution per split (no participant ids):"),
        "",
        counts.to_markdown(index=False), "",
        "## Performance", "",
        f"Held-out test set ({test['participants']} participants, {test['images']} images):", "",
        *metric_lines(metrics, task), *comparison_lines(metrics), "",
        "Validation (each fold's best epoch): " + "; ".join(
            f"{fold}: loss {v['val_loss']:.4f} at epoch {v['best_epoch']}" for fold, v in validation.items()) + ".", "",
        "## Inputs and preprocessing", "",
        f"Channels {', '.join(channels)}, on the {recipe['space']} template grid of {recipe['resolution']:g} mm, "
        f"shape {recipe['shape']}: input tensor (B, {', '.join(map(str, spec['input']['shape']))}), float32.", "",
        *[f"{i}. {step}" for i, step in enumerate(recipe["steps"], 1)], "",
        "## Limitations", "",
        *[f"- {line}" for line in limits], "",
        "## License", "",
        *license_lines(card.license), "",
        "## Files", "",
        "`spec.json` (architecture, task, classes, input), `preprocessing.json` (the recipe), `normalisation.json` "
        "(target coder and bias correction per fold), `metrics.json`, `weights/*.safetensors`, "
        "`statistics/train_mean.safetensors` (each fold's mean training image), `grid/`, `model.onnx` ("
        + ("every fold's network on a batch of views, see `spec.json` `inference`" if segmentation else "the ensemble")
        + "), `checksums.sha256`.", "",
    ]
    return "\n".join(lines)


def render_imported(spec: dict, recipe: dict, unproducible: list[str]) -> str:
    """The card of an imported package (``pipeline.sharing.importer``): where it came from, what
    it expects and predicts, the parity check, what this pipeline cannot prepare for it, its license."""
    source, parity, arch, output = spec["source"], spec["parity"], spec["architecture"], spec["output"]
    predicts = {"scalar": f"`{spec['target']}` (regression: output × {output.get('scale', 1)} + {output.get('shift', 0)})",
                "bins": f"`{spec['target']}` as the expected value over {spec['outputs']} soft-label bins "
                        f"(centres {output.get('bins', [None])[0]} … {output.get('bins', [None])[-1]})",
                "logits": f"`{spec['target']}` among {spec['classes']} (class logits; probabilities by softmax)",
                "labels": f"label maps ({', '.join(f'{k} {n}' for k, n in enumerate(spec['classes'] or []))})"}[output["type"]]
    network = {"monai_bundle": "the MONAI bundle's own `network_def` (MONAI classes)",
               "keras_port": "the Keras model ported layer by layer to PyTorch (`pipeline.learning.ported`)",
               "user_code": f"**user code**, `{arch['args'].get('factory')}` (not part of this pipeline: it must be "
                            "importable wherever the package is used, and is trusted as code)"}.get(
        arch["name"], f"the registered `{arch['name']}` network, arguments {arch['args'] or 'default'}")
    lines = [
        f"# Model card: {spec['task']} of `{spec['target']}` (imported)", "",
        f"Imported from `{source['file']}` ({source['kind']}" + (f", sha256 {source['sha256']}" if source.get("sha256") else "")
        + f") with `bids-deepstudy import`. Network: {network}."
        + (f" Tensor names: prefix `{source['prefix_stripped']}` stripped." if source.get("prefix_stripped") else "")
        + (f" Tensors renamed by the mapping file `{source['mapping']}`." if source.get("mapping") else ""), "",
        "This model was trained elsewhere: its training data, intended use and performance are its authors'. "
        "No test metrics were measured by this pipeline; measure them on your data before relying on it.", "",
        "## Predicts", "", predicts + ".", "",
        "## Inputs", "",
        f"Channels {', '.join(spec['input']['channels'])} on the {recipe['space']} grid of {recipe['resolution']:g} mm, "
        f"shape {recipe['shape']}" + (f", crop {recipe['crop']}" if recipe.get("crop") else "")
        + f"; brain extraction: {recipe['brain_extraction']}; intensity: {recipe['normalisation']}. "
        f"Input tensor (B, {', '.join(map(str, spec['input']['shape']))}), float32.", "",
        *([f"This pipeline's preprocessing cannot make this input; `apply` and fine-tuning refuse it:", "",
           *[f"- {line}" for line in unproducible], ""] if unproducible else
          ["This pipeline's preprocessing makes this input:", "", *[f"{i}. {s}" for i, s in enumerate(recipe["steps"], 1)], ""]),
        "## Parity", "",
        f"On a reference input ({parity['reference_input']}) the package, loaded as `apply` loads it, differs from "
        f"{parity['against']} by at most {parity['max_abs_difference']:.3g} (tolerance {parity['tolerance']}). "
        f"ONNX Runtime on `model.onnx` differs from PyTorch by {spec['onnx']['max_abs_difference']:.3g}.", "",
        "## License", "",
        *(["No license was declared at import (`--license`): ask the model's authors before using or redistributing it."]
          if spec["license"] == UNSPECIFIED else license_lines(spec["license"])),
        *([] if spec.get("redistribution", True) else ["", "Its license forbids redistribution: the registry refuses it."]), "",
    ]
    return "\n".join(lines)
