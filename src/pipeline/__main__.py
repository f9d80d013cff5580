"""``bids-deepstudy`` (also ``python -m pipeline``): the one door for people; each command runs the
``main(argv)`` of the module that does the work (``COMMANDS``).

    bids-deepstudy run BIDS_DIR OUTPUT_DIR participant|group [--config-file my.yaml] [--work-dir DIR]
                       [--participant-label ...] [--cores N] [--device cpu|cuda] [--dry-run]
                                                 a study as a BIDS App (run --help)
    bids-deepstudy run [SNAKEMAKE ARGS]          a study: the config and data pre-flight, then Snakemake
                                                 on the packaged Snakefile (pipeline.run;
                                                 --skip-preflight: no data pre-flight;
                                                 --cores all unless --cores/--jobs/--profile;
                                                 --profile slurm is the packaged SLURM profile;
                                                 --skip-bids-validation: no BIDS validation of the input)
    bids-deepstudy init BIDS_DIR [--target COL] [--out my.yaml]
                                                 a study config for a dataset, from config/study.yaml
                                                 with its facts filled in (pipeline.intake.initconfig)
    bids-deepstudy check CONFIG                  every config problem, then the data pre-flight: the
                                                 dataset's index and headers (pipeline.check)
    bids-deepstudy demo OUT_DIR [...]            the simulated demo cohort (pipeline.demo)
    bids-deepstudy apply BIDS_DIR OUTPUT_DIR participant --model M [...]
                                                 a model package on new images (pipeline.sharing.apply)
    bids-deepstudy register PACKAGE --name N     put a package into the registry
    bids-deepstudy fetch NAME [--out DIR]        get one (pipeline.sharing.registry)
    bids-deepstudy import SOURCE --out DIR [...] a model trained elsewhere as a package
                                                 (pipeline.sharing.importer)
    bids-deepstudy models list [--registry R]    the registry's packages: versions, task, input, licence
    bids-deepstudy inspect PACKAGE               what a package (folder, .tar.gz or registry name) expects
                                                 and predicts, parity, licence (pipeline.sharing.zoo)
    bids-deepstudy networks                      the registered networks (config train.model), their
                                                 dimensions and tasks (pipeline.learning.models)
    bids-deepstudy augment ARRAY.npy --out preview.png [--augmentation JSON]
                                                 an augmentation setting's draws on one preprocessed
                                                 array (pipeline.learning.augment)

``COMMAND --help`` shows each one's options. Snakemake and every job run on the interpreter this
package is installed in (its bin folder first on PATH), so the environment needs no activating.
The workflow's rules do not come through here: each runs its stage's module itself
(``python -m pipeline.intake.ingest``, ``python -m pipeline.results.explain`` …).
"""

from __future__ import annotations

import importlib
import sys

PROG = "bids-deepstudy"
# command → (module whose main(argv) runs it, arguments put before the user's)
COMMANDS = {
    "run": ("pipeline.run", []),
    "init": ("pipeline.intake.initconfig", []),
    "check": ("pipeline.check", []),
    "demo": ("pipeline.demo.__main__", []),
    "apply": ("pipeline.sharing.apply", []),
    "register": ("pipeline.sharing.registry", ["register"]),
    "fetch": ("pipeline.sharing.registry", ["fetch"]),
    "import": ("pipeline.sharing.importer", []),
    "models": ("pipeline.sharing.zoo", []),
    "inspect": ("pipeline.sharing.zoo", ["inspect"]),
    "networks": ("pipeline.learning.models", []),
    "augment": ("pipeline.learning.augment", []),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from pipeline import __version__

        print(f"{PROG} {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"{PROG}: unknown command {name!r}; choose one of: {', '.join(COMMANDS)} (--help says more).")
    module, before = COMMANDS[name]
    sys.argv[0] = PROG if before else f"{PROG} {name}"  # usage lines name the command (register/fetch: its own)
    importlib.import_module(module).main([*before, *rest])


if __name__ == "__main__":
    main()
