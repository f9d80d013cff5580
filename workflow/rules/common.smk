import shlex
import sys
from pathlib import Path

from snakemake.utils import validate


# Jobs run `python -m pipeline.<room>.<module>`. Without --use-conda/--use-apptainer that is the interpreter
# running Snakemake (its bin folder goes first on the jobs' PATH: `.venv/bin/snakemake` works without
# activating the venv); with them, the rule's environment's python.
# In a checkout (workflow/ beside src/) the checkout's package goes first on the jobs' import path and
# on the Snakefile's; an installed wheel (workflow/ as the package data pipeline/workflow) is
# importable by its interpreter already.
SRC = Path(workflow.basedir).parent / "src" / "pipeline"
JOB_PREFIX = ""
if not workflow.deployment_settings.deployment_method:
    JOB_PREFIX = f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
if SRC.is_dir():
    JOB_PREFIX += f"export PYTHONPATH={shlex.quote(str(SRC.parent))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    sys.path.insert(0, str(SRC.parent))
shell.prefix(JOB_PREFIX)
from pipeline.check import check as check_config  # the schema's checks and the stages' checks across keys
from pipeline.common.errors import InputError
from pipeline.common.config import stage_config
from pipeline.common.outputs import check_writable
from pipeline.common.paths import SPACE, exclusion_record, group_figure, group_map
from pipeline.common.paths import preprocessed as preprocessed_paths
from pipeline.common.snakemake_compat import fix_group_components
from pipeline.intake import recipe
from pipeline.intake import workflowinputs
from pipeline.intake.workflowinputs import code, parent_of, parents_of
from pipeline.learning import launch, variants
from pipeline.sharing import registry
from pipeline.common.package import files as package_files

# Every config problem at once, each naming its key and what to set (then validate fills in defaults);
# a Grad-CAM layer is checked against the configured network, built on torch's meta device.
try:
    check_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
    validate(config, schema="../schemas/config.schema.yaml")
    check_writable(Path(config["results_dir"]), create=False)
    if config["work_dir"]:
        check_writable(Path(config["work_dir"]), key="work_dir", create=False)
except InputError as error:  # the message alone: no file/line prefix and no traceback
    print(f"ERROR: {error}", file=sys.stderr)
    sys.exit(2)

# Cluster profiles batch preprocessing with --group-components; in a workflow with a checkpoint
# Snakemake 9 needs a fix for that, installed when the installed Snakemake shows the bug
# (pipeline/common/snakemake_compat.py).
fix_group_components()

# The output folder (the BIDS-App command's OUTPUT_DIR).
OUTPUT = config["results_dir"]
# Config work_dir (the BIDS-App command's --work-dir): what only the workflow itself reads again goes
# there instead of results_dir: the trained networks with their checkpoints and TensorBoard logs
# (train/), the study grid (grid/), ingest's cache, a package fetched for fine-tuning (init/).
WORK = config["work_dir"] or OUTPUT
# Where the stages write. A study: the output folder. Apply mode (config apply): the work folder, every
# stage of it; the output folder is then one BIDS derivative dataset, written last (rule applyout),
# and the report (without work_dir, as a plain `snakemake --configfile` run, both are the same folder).
RESULTS = WORK if config["apply"] else OUTPUT
BIDS = config["bids_dir"]
# Preprocessing writes in the work folder (its arrays, which every later stage reads, beside its images).
# A study with a work folder publishes the images, sidecars, transforms and QC figures (not the arrays)
# to the output folder's derivatives/pipeline (rule publish, hard links); without one the
# two are the same folder, as is apply mode's (its output folder is a dataset of its own, applyout).
PREPROC = f"{WORK}/derivatives/pipeline"
PUBLISHED = f"{OUTPUT}/derivatives/pipeline"
PUBLISH = not config["apply"] and PUBLISHED != PREPROC
# The ensemble's test predictions and their explanation maps, a BIDS derivative dataset (pipeline.results.bidsout).
PREDICTIONS_DATASET = f"{RESULTS}/derivatives/predictions"
GRID = f"{WORK}/grid"
CHANNELS = list(config["channels"])  # the first is the reference (registration, native space)
FOLDS = [f"fold-{k}" for k in range(1, config["split"]["folds"] + 1)]
RECIPE = recipe.from_config(config["preprocess"], config["channels"], config["bids_filters"])
EXPLAIN = config["explain"]
METHODS = EXPLAIN["methods"]
SETTINGS = {k: EXPLAIN[k] for k in ("window", "stride", "baseline", "smoothgrad_samples", "smoothgrad_noise",
                                    "ig_steps", "ig_baseline", "gradcam_layer")}
# What the maps of one image depend on (the ground truth scores them and the atlas sums them by
# region, both in the group step only).
MAP_SETTINGS = {k: v for k, v in EXPLAIN.items() if k not in ("groundtruth", "atlas")}
# Fine-tuning (config train.init_from): the package is fetched into INIT_DIR ("latest" without a version).
INIT = registry.parse_name(config["train"]["init_from"]) if config["train"]["init_from"] else None
INIT_DIR = f"{WORK}/init/{INIT.owner}/{INIT.name}/{INIT.version or 'latest'}" if INIT else None
# Hyperparameter variants (config train.variants): one training job per fold and variant, in
# train/fold-K/variant-NAME; the variants rule copies the best on validation to train/fold-K.
VARIANTS = config["train"]["variants"]
variants.check(config["train"])
TRAIN_RUN = "{fold}/variant-{variant}" if VARIANTS else "{fold}"
FOLD_MODEL, FOLD_HISTORY = (f"{WORK}/train/{{fold}}/{name}" for name in ("model.pt", "history.tsv"))
# With variants, a fold's model is their choice: asking for variants.tsv trains them in a finished study too.
FOLD_CHOICE = [f"{WORK}/train/{{fold}}/variants.tsv"] if VARIANTS else []
# Apply mode (config apply; bids-deepstudy apply): a fetched package predicts for new images.
APPLY = config["apply"]
# Segmentation (task: segmentation): the label image is the target; `target` only stratifies the
# split (as a categorical column); no explanation maps. Applying a segmentation package needs no
# label image; given one (config label_image), the label maps are scored against it.
SEGMENTATION = config["task"] == "segmentation"
SPLIT_TASK = "classification" if SEGMENTATION else config["task"]
LABEL = bool(config["label_image"])  # preprocessing carries the label image to the template grid
LABEL_NAMES = (config["label_image"] or {}).get("labels")
if SEGMENTATION and not LABEL and not APPLY:
    raise ValueError("config `task: segmentation` needs config `label_image` (the label image per sample, e.g. "
                     "{derivatives: derivatives/tissue, filters: {suffix: dseg, desc: tissue}}).")
if SEGMENTATION and config["train"]["init_from"]:
    raise ValueError("config `task: segmentation` cannot fine-tune a package: set `train.init_from` to null.")


PACKAGE_SPEC = workflowinputs.package_spec(APPLY["package"], RECIPE) if APPLY else None


wildcard_constraints:
    subdir=r"sub-[A-Za-z0-9]+(/ses-[A-Za-z0-9]+)?",
    image=r"sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*",
    fold=r"fold-[0-9]+",
    variant=r"[A-Za-z0-9]+",


# The input functions of the rules: the study's values bound to the functions of
# pipeline.intake.workflowinputs, which do the work.


def ingest_tables(wildcards):
    """The tables ingest reads (participants.tsv or the non-BIDS table; sessions.tsv files)."""
    return workflowinputs.ingest_tables(BIDS, config["non_bids"], config["target_source"])


def ingest_fingerprint():
    """Listing fingerprint of the dataset (and of the label images' and brain masks' folders)."""
    derivatives = [config[key]["derivatives"] for key in ("label_image", "brain_mask") if config[key]]
    return workflowinputs.dataset_fingerprint(BIDS, derivatives)


def manifest():
    """The ingest checkpoint's manifest (one row per sample), indexed by image id."""
    return workflowinputs.read_manifest(checkpoints.ingest.get().output.manifest)


def source_images(wildcards):
    """Native images of one sample, one per channel (reference first)."""
    return workflowinputs.source_images(manifest(), wildcards.image, CHANNELS)


def source_brain_mask(wildcards):
    """The sample's brain mask (config brain_mask, with preprocess.brain_extraction: derivatives)."""
    if config["preprocess"]["brain_extraction"] != "derivatives":
        return []
    return [manifest().loc[wildcards.image, "brain_mask"]]


def source_label(wildcards):
    """The sample's label image (config label_image); none without one."""
    return [manifest().loc[wildcards.image, "label"]] if LABEL else []


def preprocessed(role):
    """Input function: the preprocessed ``role`` file (e.g. ``array``, ``qc``) of every sample."""
    return lambda wildcards: workflowinputs.preprocessed(manifest(), PREPROC, role, CHANNELS, LABEL)


def exclusion_records(wildcards):
    """Input function: preprocessing's exclusion record of every sample of the manifest."""
    return workflowinputs.exclusion_records(manifest(), PREPROC)


def preproc_root(wildcards, input):
    """Param function: the derivatives root, recovered from the first preprocessed array input."""
    return workflowinputs.preproc_root(manifest(), input.arrays)
