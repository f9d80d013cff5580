rule train:
    """One model per fold (and per hyperparameter variant, with train.variants)."""
    input:
        manifest=rules.exclusions.output.samples,
        splits=f"{RESULTS}/splits.tsv",
        targets=f"{RESULTS}/targets.json",
        arrays=preprocessed("array"),
        labels=preprocessed("label_array") if SEGMENTATION else [],
        init=[f"{INIT_DIR}/checksums.sha256"] if INIT else [],
        code=code("learning.train"),
    output:
        model=f"{WORK}/train/{TRAIN_RUN}/model.pt",
        history=f"{WORK}/train/{TRAIN_RUN}/history.tsv",
        diagnostics=f"{WORK}/train/{TRAIN_RUN}/diagnostics.json",
        hyperparameters=f"{WORK}/train/{TRAIN_RUN}/hyperparameters.json",
    params:
        # One process, or torchrun with one per GPU (config train.gpus > 1: pipeline.learning.launch).
        launcher=lambda wildcards: launch.launcher(launch.processes(config["train"], wildcards.get("variant"))),
        device=config["device"],
        preproc_dir=preproc_root,
        out_dir=parent_of("model"),
        # train.tracking: mlflow: one store and experiment per study, a run per fold and variant
        mlflow_store=f"{RESULTS}/mlflow",
        mlflow_experiment=str(Path(RESULTS).resolve()),
        mlflow_run=lambda wildcards: TRAIN_RUN.format(fold=wildcards.fold, variant=wildcards.get("variant")),
        config=lambda wildcards: stage_config(
            config,
            ["task", "channels"],
            target="label" if SEGMENTATION else config["target"],
            train=variants.hyperparameters(config["train"], wildcards.get("variant")),
            labels=LABEL_NAMES if SEGMENTATION else None,
            init={"package": INIT_DIR, "recipe": recipe.compared(RECIPE)} if INIT else None,
        ),
    log:
        f"{RESULTS}/logs/train/{TRAIN_RUN}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{TRAIN_RUN}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=lambda wildcards: launch.gpus_requested(config, wildcards.get("variant")),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "{params.launcher} -m pipeline.learning.train --config {params.config:q} --manifest {input.manifest:q} --splits {input.splits:q}"
        " --fold {wildcards.fold} --preproc-dir {params.preproc_dir:q} --targets {input.targets:q}"
        " --out-dir {params.out_dir:q} --threads {threads} --device {params.device} --mlflow-store {params.mlflow_store:q}"
        " --mlflow-experiment {params.mlflow_experiment:q} --mlflow-run {params.mlflow_run:q} > {log:q} 2>&1"


if VARIANTS:  # config train.variants: the variant with the lowest validation loss is the fold's model

    rule variants:
        input:
            histories=lambda wildcards: [f"{WORK}/train/{wildcards.fold}/variant-{v}/history.tsv" for v in VARIANTS],
            models=lambda wildcards: [f"{WORK}/train/{wildcards.fold}/variant-{v}/model.pt" for v in VARIANTS],
            code=code("learning.variants"),
        output:
            model=f"{WORK}/train/{{fold}}/model.pt",
            history=f"{WORK}/train/{{fold}}/history.tsv",
            diagnostics=f"{WORK}/train/{{fold}}/diagnostics.json",
            hyperparameters=f"{WORK}/train/{{fold}}/hyperparameters.json",
            variants=f"{WORK}/train/{{fold}}/variants.tsv",
        params:
            fold_dir=parent_of("model"),
            config=stage_config(config, ["train"]),
        log:
            f"{RESULTS}/logs/variants/{{fold}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/variants/{{fold}}.tsv"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.learning.variants {params.fold_dir:q} --config {params.config:q} > {log:q} 2>&1"


if INIT:  # config train.init_from: fetch the package to start from

    rule registry_fetch:
        input:
            code=code("sharing.registry"),
        output:
            # The package's own manifest stands for its folder (a directory output would gain a
            # .snakemake_timestamp file, which the package's checksums rightly refuse).
            f"{INIT_DIR}/checksums.sha256",
        params:
            folder=INIT_DIR,
            name=str(INIT),
            registry=registry.location(config["registry"]),
        log:
            f"{RESULTS}/logs/registry_fetch.log",
        benchmark:
            f"{RESULTS}/benchmarks/registry_fetch.tsv"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=30,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "rm -rf {params.folder:q} && python -m pipeline.sharing.registry fetch {params.name:q} --registry {params.registry:q}"
            " --out {params.folder:q} > {log:q} 2>&1"
