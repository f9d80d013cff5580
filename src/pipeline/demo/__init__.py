"""A simulated BIDS brain-age cohort built from the real MNI152 2009a template anatomy.

Every subject is the template brain (``pipeline.intake.template``) with known effects added in
template space, then seen through a random scanner: rigid pose, bias field, Rician noise,
intensity scale, voxel size and orientation. The effects:

* age: the lateral ventricles enlarge (a smooth backward warp; volume about doubles from 20
  to 80 years) and grey matter darkens in one cortical sphere (left superior parietal /
  precuneus, up to 35 % at 80 years);
* group: patients carry a focal hypointense lesion, by default in the right temporal white
  matter (about 2 cm across, 45-65 % darker at its core); ``--lesion-site deep-gm
  --lesion-radius 5 --lesion-contrast 0.25 0.40 --lesion-jitter 3`` makes the hard case instead:
  a 1 cm lesion in the right putamen, 25-40 % darker, its centre jittered ±3 mm per patient
  (``--lesion-site thalamus`` or ``hippocampus``: the right thalamus or the left hippocampus).

The raw dataset (``participants.tsv``, ``sub-XXX/[ses-YY/]anat/*_T1w.nii[.gz]``) is what a
study reads. ``derivatives/groundtruth`` holds the answers (effect masks, effect parameters,
each image's pose) for validation and tests only: training must never read it.
``derivatives/tissue`` holds a tissue segmentation of every T1w on its own grid
(``*_desc-tissue_dseg.nii.gz``: 0 background, 1 CSF, 2 GM, 3 WM; ``desc-tissue_dseg.tsv``), the
target of a segmentation study: the subject's template anatomy, ventricles warped for age like
the image, seen through the same pose and grid (nearest neighbour).

Usage: ``python -m pipeline.demo OUT_DIR --n-subjects 100 --seed 0 [--sim-resolution 1.5]``.
The output is a deterministic function of the arguments (byte-identical files). Images are
int16 NIfTI-1 with qform = sform (code 1, scanner).
"""
