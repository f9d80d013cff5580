"""Test-retest of real scan A with a model package (issue 27, item 5): the two sessions of one
person, applied to as a user would (``bids-deepstudy apply``), and the three test-retest
figures the run writes: the preprocessed images' correlation (``retest.tsv``), the difference of the
two predictions and the similarity of the two explanation maps (``retest_predictions.tsv``).

    make real-scans && make demo     # the scans; the demo's package results/package/model.tar.gz
    python benchmarks/retest.py --package results/package/model.tar.gz --work data/real/retest

Two inputs of the same two scans: ``as-shipped`` (whole head, face and neck: what the package's
recipe then does with it, e.g. the demo's ``brain_extraction: none``) and ``brain-extracted``
(each scan times deepbet's brain mask, ``pipeline.intake.brainmask.deepbet_mask``, on its own
grid: what a package trained on brain-only images, such as the demo's, expects). Prints one
Markdown row per input; ``--inputs`` picks them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

INPUTS = ("as-shipped", "brain-extracted")


def datasets(scans: Path, work: Path, inputs: list[str]) -> dict[str, Path]:
    """Scan A's two sessions as a BIDS dataset per input (built once; a rerun reuses them)."""
    from pipeline.demo.realscans import make_cohort
    from pipeline.intake.brainmask import deepbet_mask

    shipped = work / "bids-as-shipped"
    if not (shipped / "participants.tsv").exists():
        make_cohort(scans, shipped, n_variants=0, failures=(), overwrite=True)
    out = {"as-shipped": shipped}
    if "brain-extracted" in inputs:
        extracted = work / "bids-brain-extracted"
        if not (extracted / "participants.tsv").exists():
            shutil.rmtree(extracted, ignore_errors=True)
            shutil.copytree(shipped, extracted)
            for path in sorted(extracted.rglob("*_T1w.nii.gz")):
                img = nib.load(path)
                data = np.asarray(img.dataobj, dtype=np.float32) * deepbet_mask(img)
                nib.save(nib.Nifti1Image(data, img.affine), path)
        out["brain-extracted"] = extracted
    return {k: v for k, v in out.items() if k in inputs}


def apply(bids: Path, out: Path, package: Path, cores: int) -> float:
    """``bids-deepstudy apply`` on ``bids``; its seconds (a failed run's output tail is printed:
    e.g. every image excluded by quality control)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "apply", str(bids), str(out), "participant", "--model",
                           str(package), "--cores", str(cores), "--skip-bids-validation"],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "excluded at" in line or "ERROR" in line]
        print(f"apply on {bids} failed:\n" + "\n".join(errors or [(done.stdout + done.stderr)[-4000:]]), file=sys.stderr)
    return time.perf_counter() - start


def row(name: str, out: Path, seconds: float) -> dict:
    """The figures of one apply run: QC r of each session, the three test-retest figures."""
    sidecars = sorted((out / "derivatives").rglob("*_desc-preproc_T1w.json"))
    qc = [json.loads(p.read_text()).get("QC", {}).get("correlation_with_template", float("nan")) for p in sidecars]
    found = {"input": name, "qc r (ses-1, ses-2)": ", ".join(f"{r:.3f}" for r in qc)}
    if not (out / "retest_predictions.tsv").exists():  # the run failed: every image excluded, say
        found["preprocessed r"] = "no prediction: see the apply run's errors"
        return found | {"apply s": round(seconds)}
    preprocessed = pd.read_csv(out / "retest.tsv", sep="\t")
    model = pd.read_csv(out / "retest_predictions.tsv", sep="\t")
    found["preprocessed r"] = preprocessed["correlation"].iloc[0] if len(preprocessed) else float("nan")
    if len(model):
        first = model.iloc[0]
        found.update({"predicted (ses-1, ses-2)": f"{first['predicted_a']:.2f}, {first['predicted_b']:.2f}",
                      "|difference|": first["prediction_difference"]})
        for column in [c for c in model.columns if c.endswith(("_map_pearson", "_map_spearman"))]:
            found[column.replace("_map_", " ")] = first[column]
    found["apply s"] = round(seconds)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=Path, default=Path("data/real/brainbrowser"), help="make real-scans' folder")
    parser.add_argument("--package", type=Path, default=Path("results/package/model.tar.gz"))
    parser.add_argument("--work", type=Path, default=Path("data/real/retest"))
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    for name, bids in datasets(args.scans, args.work, args.inputs).items():
        out = args.work / f"applied-{name}"
        rows.append(row(name, out, apply(bids, out, args.package.resolve(), args.cores)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    table = pd.DataFrame(rows).fillna("–")
    print("| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns))
    for values in table.itertuples(index=False):
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + " |")


if __name__ == "__main__":
    main()
