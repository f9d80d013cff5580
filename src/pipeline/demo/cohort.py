"""The cohort (participants, sessions, files) and the dataset: its top-level files, the ground truth
and tissue derivatives, every subject's images (``make_demo``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from pipeline import __version__
from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.demo.anatomy import (
    AGE_RANGE, CORTEX, GM_LOSS_AT_80, MASK_THRESHOLD, TISSUE_INSIDE, TISSUES, VENTRICLE_GAIN_MM2,
    VENTRICLE_SIGMA_MM, Anatomy, effect_masks, load_anatomy, simulate_anatomy, tissue_labels,
    ventricle_volume_mm3)
from pipeline.demo.head import WholeHead, build_head, draw_head, whole_head
from pipeline.demo.lesion import Lesion
from pipeline.demo.scanner import draw_scan, render_labels, render_scan, save_nifti
from pipeline.intake.template import BRAIN_CENTRE_MM, SPACE, load_template

BIDS_VERSION = "1.9.0"
GENERATOR = "pipeline.demo"


def write_json(path: Path, content: dict) -> None:
    """Write ``content`` as indented JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(content, indent=2) + "\n")


# ----------------------------------------------------------------------------- cohort

def draw_cohort(n_subjects: int, seed: int) -> list[dict]:
    """Per subject: id, age (20-80, 1 decimal), sex, group (balanced), sessions, file extensions."""
    if n_subjects < 2:
        raise InputError(f"--n-subjects must be at least 2 (one patient, one control), got {n_subjects}.")
    if n_subjects > 999:
        raise InputError(f"--n-subjects must be at most 999 (ids are sub-001 .. sub-999), got {n_subjects}.")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}.")
    rng = np.random.default_rng(seed)
    ages = np.round(rng.uniform(*AGE_RANGE, n_subjects), 1)
    sexes = rng.choice(["M", "F"], n_subjects)
    groups = rng.permutation(["patient"] * (n_subjects // 2) + ["control"] * (n_subjects - n_subjects // 2))
    n_two = max(int(round(0.1 * n_subjects)), 1 if n_subjects >= 4 else 0)
    two = set(rng.choice(n_subjects, n_two, replace=False).tolist())
    sessions = [["ses-01", "ses-02"] if i in two else [None] for i in range(n_subjects)]
    n_images = sum(len(s) for s in sessions)
    uncompressed = set(rng.choice(n_images, int(round(n_images / 3)), replace=False).tolist())
    cohort, image = [], 0
    for i in range(n_subjects):
        extensions = []
        for _ in sessions[i]:
            extensions.append(".nii" if image in uncompressed else ".nii.gz")
            image += 1
        cohort.append({"participant_id": f"sub-{i + 1:03d}", "age": float(ages[i]), "sex": str(sexes[i]),
                       "group": str(groups[i]), "sessions": sessions[i], "extensions": extensions})
    return cohort


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite`` and it is an earlier demo."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory; choose another OUT_DIR.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir} exists and is not empty; choose another OUT_DIR or pass --overwrite.")
        description = out_dir / "dataset_description.json"
        try:
            made_here = json.loads(description.read_text())["GeneratedBy"][0]["Name"] == GENERATOR
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            made_here = False
        if not made_here:
            raise InputError(f"{out_dir} is not empty and was not written by {GENERATOR} (no matching "
                             f"{description.name}); --overwrite only replaces an earlier demo. Remove it by hand.")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def derivative_dataset(folder: Path, name: str, generated_by: list, readme: str) -> None:
    """A derivative dataset's ``dataset_description.json`` ("<name> of the simulated brain-age demo
    cohort") and ``README``."""
    write_json(folder / "dataset_description.json", {
        "Name": f"{name} of the simulated brain-age demo cohort", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": generated_by})
    atomic.write_text(folder / "README", readme)


def dataset_files(out_dir: Path, cohort: list[dict], seed: int, resolution: float, lesion: Lesion) -> None:
    """Write the raw dataset's top-level files and the ground-truth derivative's description/README."""
    generated_by = [{"Name": GENERATOR, "Version": __version__,
                     "Description": f"Simulated from the {SPACE} template; seed {seed}, "
                                    f"simulation resolution {resolution} mm."}]
    write_json(out_dir / "dataset_description.json", {
        "Name": "Simulated brain-age demo cohort", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "License": "CC0", "GeneratedBy": generated_by})
    atomic.write_text(out_dir / "README",
        f"Simulated T1w brain-age cohort ({len(cohort)} participants) generated by `python -m {GENERATOR}`.\n"
        f"Each image is the {SPACE} template with an age effect (ventricle enlargement, grey-matter loss in\n"
        f"the {CORTEX.name}) and, for patients, a lesion in the {lesion.site.name}, seen under a random\n"
        "rigid pose, bias field, Rician noise, intensity scale, voxel size and orientation.\n"
        "derivatives/groundtruth holds the true effect masks and poses: for validation only.\n")
    rows = ["participant_id\tage\tsex\tgroup"] + [
        f"{s['participant_id']}\t{s['age']:.1f}\t{s['sex']}\t{s['group']}" for s in cohort]
    atomic.write_text(out_dir / "participants.tsv", "\n".join(rows) + "\n")
    write_json(out_dir / "participants.json", {
        "participant_id": {"Description": "Participant identifier."},
        "age": {"Description": "Age at scan (all sessions of a participant share it).", "Units": "years"},
        "sex": {"Description": "Sex.", "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "Diagnostic group.",
                  "Levels": {"patient": f"has a lesion in the {lesion.site.name}", "control": "healthy control"}}})
    derivative_dataset(out_dir / "derivatives" / "groundtruth", "Ground truth", generated_by,
        "GROUND TRUTH of the simulation, for validation and tests only. Training must NEVER read these files.\n\n"
        f"space-{SPACE}_desc-age_mask.nii.gz / desc-group_mask.nii.gz: uint8 masks on the 1 mm template\n"
        "  grid of where the age and group effects change the image.\n"
        f"space-{SPACE}_desc-effects.json: the regions, effect sizes and mask volumes.\n"
        f"sub-*/[ses-*/]anat/*_from-{SPACE}_to-T1w_pose.json: 'matrix' is the 4x4 RAS+ mm transform A with\n"
        "  x_scanner = A @ [x_template, 1]; 'simulation' lists the image's other nuisance and anatomy.\n")
    tissue = out_dir / "derivatives" / "tissue"
    derivative_dataset(tissue, "Tissue segmentation", generated_by,
        "Tissue segmentation of every T1w on its own grid: sub-*/[ses-*/]anat/*_desc-tissue_dseg.nii.gz (uint8,\n"
        "labels in desc-tissue_dseg.tsv). The template's GM and WM probabilities, with the subject's age warp,\n"
        f"argmax of CSF/GM/WM where the brain fraction is at least {TISSUE_INSIDE}, seen through the image's pose\n"
        "and grid (nearest neighbour). The target of a segmentation study (config/segmentation.yaml).\n")
    rows = ["index\tname"] + [f"{k}\t{v}" for k, v in TISSUES.items()]
    atomic.write_text(tissue / "desc-tissue_dseg.tsv", "\n".join(rows) + "\n")


def effects_description(anatomy: Anatomy, masks: dict[str, np.ndarray], resolution: float, lesion: Lesion) -> dict:
    """Content of the effects JSON: the regions, effect sizes and mask volumes (mm^3)."""
    centroid = ndi.center_of_mass(anatomy.ventricles)
    centroid_mm = anatomy.affine[:3, :3] @ np.array(centroid) + anatomy.affine[:3, 3]
    young, old = ventricle_volume_mm3(anatomy, AGE_RANGE[0]), ventricle_volume_mm3(anatomy, AGE_RANGE[1])
    return {
        "Space": SPACE,
        "SimulationResolutionMM": resolution,
        "AgeRangeYears": list(AGE_RANGE),
        "Effects": [
            {"effect": "age", "name": "lateral ventricles", "kind": "enlargement (smooth backward warp)",
             "centroid_mm": [round(float(v), 2) for v in centroid_mm],
             "volume_mm3_at_age_20": round(young, 1), "volume_mm3_at_age_80": round(old, 1),
             "displacement": f"{VENTRICLE_GAIN_MM2} mm^2 * (age-20)/60 * gradient of the ventricle mask "
                             f"smoothed with sigma {VENTRICLE_SIGMA_MM} mm"},
            {"effect": "age", "name": CORTEX.name, "kind": "grey-matter intensity loss",
             "centre_mm": list(CORTEX.centre_mm), "radius_mm": CORTEX.radius_mm, "edge_mm": CORTEX.edge_mm,
             "intensity_multiplier": f"1 - {GM_LOSS_AT_80} * (age-20)/60 * GM probability"},
            {"effect": "group", "name": lesion.site.name, "kind": "focal hypointense lesion (patients only)",
             "centre_mm": list(lesion.site.centre_mm), "radius_mm": lesion.site.radius_mm,
             "edge_mm": lesion.site.edge_mm,
             "radius_mm_range": [lesion.site.radius_mm * s for s in lesion.radius_scale],
             "core_intensity_multiplier_range": list(lesion.multiplier),
             **({"centre_jitter_mm": lesion.jitter_mm} if lesion.jitter_mm else {})},
        ],
        "Masks": {
            name: {"file": f"space-{SPACE}_desc-{name}_mask.nii.gz",
                   "volume_mm3": int(mask.sum()),
                   "threshold": f"|change| > {MASK_THRESHOLD} * mean brain intensity"}
            for name, mask in masks.items()},
    }


def make_demo(out_dir: Path, n_subjects: int = 100, seed: int = 0, sim_resolution: float = 1.5,
              overwrite: bool = False, lesion: Lesion = Lesion(), head: WholeHead | None = None) -> Path:
    """Write the simulated BIDS cohort (and its ground truth) to ``out_dir``; return ``out_dir``.
    ``lesion``: the patients' lesion (the default is the demo's temporal white-matter one).
    ``head``: whole-head images (``pipeline.demo.head``) instead of brain-only ones; each image's
    true brain (the tissue labels > 0) is then also written as ``*_desc-brain_mask.nii.gz`` in the
    ground truth."""
    out_dir = Path(out_dir)
    cohort = draw_cohort(n_subjects, seed)
    anatomy = load_anatomy(sim_resolution)  # before touching out_dir: fail early
    prepare_out_dir(out_dir, overwrite)
    dataset_files(out_dir, cohort, seed, sim_resolution, lesion)

    template = load_template("T1w")
    masks = effect_masks(anatomy, template.shape, lesion)
    truth = out_dir / "derivatives" / "groundtruth"
    for name, mask in masks.items():
        save_nifti(mask, template.affine, truth / f"space-{SPACE}_desc-{name}_mask.nii.gz")
    write_json(truth / f"space-{SPACE}_desc-effects.json", effects_description(anatomy, masks, sim_resolution, lesion))

    wm_level = float(np.median(anatomy.t1[anatomy.wm > 0.9]))
    geometry = build_head(anatomy) if head else None
    for i, subject in enumerate(cohort):
        rng = np.random.default_rng([seed, i])
        drawn = lesion.draw(rng) if subject["group"] == "patient" else None
        volume = simulate_anatomy(anatomy, subject["age"], drawn, lesion.site.edge_mm)
        volume_affine, layers = anatomy.affine, {}
        if head:  # its own random stream: the brain-only cohort's draws stay as they were
            layers = draw_head(np.random.default_rng([seed, i, 1]))
            volume, volume_affine = whole_head(geometry, volume, layers, sim_resolution), geometry.affine
        labels = tissue_labels(anatomy, subject["age"])
        for session, extension in zip(subject["sessions"], subject["extensions"]):
            scan = draw_scan(rng, head.voxel_mm) if head else draw_scan(rng)
            scan.update(head.scan_fields() if head else {})
            data, affine, pose = render_scan(volume, volume_affine, scan, wm_level)
            if head and head.deface:
                data[render_labels(geometry.face.astype(np.uint8), geometry.affine, scan) > 0] = 0
            subdir = Path(subject["participant_id"], *([session] if session else []), "anat")
            stem = "_".join([subject["participant_id"], *([session] if session else [])])
            save_nifti(data, affine, out_dir / subdir / f"{stem}_T1w{extension}")
            tissue = render_labels(labels, anatomy.affine, scan)
            save_nifti(tissue, affine, out_dir / "derivatives" / "tissue" / subdir / f"{stem}_desc-tissue_dseg.nii.gz")
            if head:
                save_nifti((tissue > 0).astype(np.uint8), affine, truth / subdir / f"{stem}_desc-brain_mask.nii.gz")
            write_json(out_dir / subdir / f"{stem}_T1w.json", {
                "Manufacturer": "Simulated", "MagneticFieldStrength": 3,
                "VoxelSize": [scan["voxel_mm"]] * 3, "Orientation": scan["orientation"]})
            write_json(truth / subdir / f"{stem}_from-{SPACE}_to-T1w_pose.json", {
                "matrix": [[round(float(v), 10) for v in row] for row in pose],
                "rotation_deg": scan["rotation_deg"], "translation_mm": scan["translation_mm"],
                "rotation_centre_mm": [float(v) for v in BRAIN_CENTRE_MM],
                "convention": "x_scanner = matrix @ [x_template, 1] (RAS+ mm); rotation Rz @ Ry @ Rx about "
                              "rotation_centre_mm, then translation",
                "simulation": {"age": subject["age"], "group": subject["group"],
                               "lesion_radius_mm": drawn["radius_mm"] if drawn else None,
                               "lesion_core_multiplier": drawn["multiplier"] if drawn else None,
                               **({"lesion_centre_mm": drawn["centre_mm"] if drawn else None}
                                  if lesion.jitter_mm else {}),
                               **({"head": {**layers, "defaced": head.deface}} if head else {}),
                               **{k: v for k, v in scan.items() if k not in ("rotation_deg", "translation_mm")}},
            })
    return out_dir
