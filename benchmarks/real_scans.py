"""Real scans: every QC score and verdict of the real-anatomy cohort (issue 27), and seconds per image.

    make real-scans
    python -m pipeline.demo.realscans data/real/brainbrowser data/real/cohort
    python benchmarks/real_scans.py data/real/cohort --out data/real/bench-2mm --resolution 2 --jobs 2

COHORT is a dataset of ``pipeline.demo.realscans`` (its ``participants.tsv`` says which images are
``good`` and which are induced failures). The pipeline's own functions run on it, as the workflow
runs them: ingest → preprocess (``config/study.yaml``'s recipe: deepbet, N4, rigid then affine,
on the ``--resolution`` grid; ``on_error: continue``) → exclusions with the cohort QC rule
(``pipeline.intake.exclusions.cohort_qc``, config ``qc``) → ``qc.tsv``. Preprocessing runs ``--jobs``
images at once, each on one ITK thread (as the workflow's jobs); a rerun with the same ``--out``
keeps the preprocessed images (``--rescore`` recomputes their scores with today's code).

Writes ``OUT/qc.tsv`` (the workflow's table, with ``expected`` and ``what``), ``OUT/excluded.tsv``
and prints one Markdown row per image: every score, the verdict, and whether it is the expected one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHAPES = {4.0: (40, 48, 40), 2.0: (80, 96, 80)}


def one(args: tuple) -> tuple[str, float]:
    """Preprocess one sample (a worker process: one ITK thread); its image id and seconds."""
    source, out_dir, subdir, image_id, grid, settings, rescore = args
    import nibabel as nib
    import numpy as np

    from pipeline.common.paths import derivative_paths
    from pipeline.intake import preprocess, qc

    out = derivative_paths(out_dir, subdir, image_id)
    record = Path(out_dir) / "records" / f"{image_id}.tsv"
    if record.exists() and out[f"sidecar_T1w"].exists():
        if rescore and out["image_T1w"].stat().st_size:
            rescore_sidecar(out, grid)
        return image_id, float("nan")
    start = time.perf_counter()
    preprocess.preprocess_or_exclude([Path(source)], out, image_id, "continue", record, template=grid[0],
                                     mask=grid[1], settings=settings, threads=1)
    return image_id, time.perf_counter() - start


def rescore_sidecar(out: dict, grid) -> None:
    """Recompute a finished sample's QC scores from its written files (today's ``qc.scores``)."""
    import ants
    import nibabel as nib
    import numpy as np

    from pipeline.intake import qc
    from pipeline.intake.geometry import ants_image

    template, mask = nib.load(grid[0]), nib.load(grid[1])
    native = nib.load(out["brain_mask"])
    fixed = ants.image_read(str(grid[0]))
    moving = ants.reorient_image2(ants_image(np.asarray(native.dataobj), native.affine), ants.get_orientation(fixed))
    subject = ants.apply_transforms(fixed, moving, [str(out["forward"])], interpolator="linear").numpy() > 0.5
    ml = float(np.asarray(native.dataobj).sum() * abs(np.linalg.det(native.affine[:3, :3]))) / 1000
    from pipeline.intake.preprocess import in_view, load_native

    source = Path(json.loads(out["sidecar_T1w"].read_text())["Sources"][0].removeprefix("file://"))
    reference = ants.reorient_image2(load_native(source)[0], ants.get_orientation(fixed))
    view = in_view(fixed, reference, out["forward"])
    sidecar = json.loads(out["sidecar_T1w"].read_text())
    sidecar["QC"] = qc.scores(nib.load(out["image_T1w"]).get_fdata(), template.get_fdata(), mask.get_fdata() > 0,
                              subject, spacing_mm=float(template.header.get_zooms()[0]), native_brain_ml=ml,
                              in_view=view)
    out["sidecar_T1w"].write_text(json.dumps(sidecar, indent=2))


def verdict(because: str) -> str:
    """The short form of a ``flagged_because``: its stage and the scores (or the first clause) at fault."""
    stage, _, reason = because.partition(": ")
    if stage == "qc":
        reason = reason.removeprefix("registration quality control (config qc): ").split(". Look at")[0]
        reason = "; ".join(part.split(" (qc.robust_z")[0].replace(" is ", " ").replace(" robust SD worse than the "
                                                                                     "cohort's median", " SD below median")
                           for part in reason.split("; "))
    else:
        reason = reason.split(": ", 1)[-1].split(". ")[0].split(": no brain")[0]
    return f"flagged at {stage}: {reason}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=float, default=2.0, choices=sorted(SHAPES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-n4", action="store_true")
    parser.add_argument("--rescore", action="store_true", help="recompute the scores of kept preprocessed images")
    parser.add_argument("--only-done", action="store_true", help="preprocess nothing: the table of the images "
                        "already preprocessed under --out (a partial run)")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # the workers inherit it, before ants is imported
    import pandas as pd

    from pipeline.common.config import resolved
    from pipeline.demo import realscans
    from pipeline.intake import exclusions, grid, qc
    from pipeline.intake.ingest import ingest

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tpl, msk = out / "grid" / "tpl.nii.gz", out / "grid" / "mask.nii.gz"
    if not tpl.exists():
        grid.write_grid(args.resolution, SHAPES[args.resolution], tpl, msk)
    settings = {"resolution": args.resolution, "shape": list(SHAPES[args.resolution]), "transform": "Affine",
                "registration_resolution": args.resolution, "n4": not args.no_n4, "brain_extraction": "deepbet",
                "qc_min": None}
    result = ingest(args.cohort, "age", "regression")
    result.report.to_csv(out / "ingest_report.tsv", sep="\t", index=False)
    result.manifest.to_csv(out / "manifest.tsv", sep="\t", index=False)
    (out / "preproc" / "records").mkdir(parents=True, exist_ok=True)
    manifest = result.manifest
    if args.only_done:
        done = {p.stem for p in (out / "preproc" / "records").glob("*.tsv")}
        manifest = manifest[manifest["image_id"].isin(done)].reset_index(drop=True)
    tasks = [(row.path, out / "preproc", row.subdir, row.image_id, (tpl, msk), settings, args.rescore)
             for row in manifest.itertuples()]
    seconds = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for image_id, took in pool.map(one, tasks):
            seconds[image_id] = took
            print(f"{image_id}: {took:.1f} s", file=sys.stderr, flush=True)
    timing = out / "seconds.json"
    known = json.loads(timing.read_text()) if timing.exists() else {}
    known.update({k: round(v, 1) for k, v in seconds.items() if v == v})
    timing.write_text(json.dumps(known, indent=2))
    records = sorted((out / "preproc" / "records").glob("*.tsv"))
    excluded = exclusions.gather(out / "ingest_report.tsv", records)
    rule = resolved(["qc"], {})
    excluded = pd.concat([excluded, exclusions.cohort_qc(manifest, out / "preproc", excluded, rule)],
                         ignore_index=True)
    exclusions.write(excluded, out / "excluded.tsv")
    table = qc.gather(manifest, out / "preproc", excluded)
    people = pd.read_csv(args.cohort / "participants.tsv", sep="\t", dtype=str)
    table = table.merge(people[["participant_id", "expected", "what"]], on="participant_id", how="left")
    table["seconds"] = table["image_id"].map(known)
    table.to_csv(out / "qc.tsv", sep="\t", index=False)
    scores = [s for s in qc.SCORES if table[s].notna().any()]
    short = {"correlation_with_template": "r", "mutual_information_with_template": "NMI",
             "local_correlation_with_template": "local r", "brain_mask_dice_with_template": "Dice",
             "template_brain_in_view": "in view", "brain_offset_mm": "offset mm", "brain_volume_ml": "brain ml"}
    print("| image | expected | " + " | ".join(short.get(s, s) for s in scores) + " | s | verdict |")
    print("|---" * (len(scores) + 4) + "|")
    for row in table.sort_values(["expected", "image_id"], ascending=[False, True]).itertuples():
        flagged = row.excluded == "yes"
        what = f" ({row.what})" if row.expected == "failure" or row.what in realscans.FAILURES else ""
        values = " | ".join("–" if pd.isna(getattr(row, s)) else f"{getattr(row, s):g}" for s in scores)
        ok = flagged == (row.expected == "failure")
        print(f"| {row.image_id}{what} | {row.expected} | {values} | {row.seconds if row.seconds == row.seconds else '–'} | "
              f"{verdict(row.flagged_because) if flagged else 'passes'}{'' if ok else ' **(wrong)**'} |")
    good = table[table["expected"] == "good"]
    print(f"\ngood flagged: {int((good['excluded'] == 'yes').sum())} of {len(good)}; failures flagged: "
          f"{int((table[table['expected'] == 'failure']['excluded'] == 'yes').sum())} of "
          f"{int((table['expected'] == 'failure').sum())}; median seconds per image "
          f"{pd.Series(list(known.values())).median():.1f}")


if __name__ == "__main__":
    main()
