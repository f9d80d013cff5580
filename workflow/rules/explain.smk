rule explain:
    input:
        manifest=rules.exclusions.output.samples,
        splits=f"{RESULTS}/splits.tsv",
        model=FOLD_MODEL,
        choice=FOLD_CHOICE,
        arrays=preprocessed("array"),
        mask=rules.grid.output.mask,
        code=code("results.explain"),
    output:
        index=f"{RESULTS}/explain/{{fold}}/maps.tsv",
        maps=directory(f"{RESULTS}/explain/{{fold}}/maps"),
        group=[group_map(f"{RESULTS}/explain/{{fold}}", m, s) for m in METHODS for s in ("mean", "sd", "t")],
        randomisation=f"{RESULTS}/explain/{{fold}}/randomisation.tsv",
    params:
        preproc_dir=preproc_root,
        out_dir=parent_of("index"),
        config=stage_config(config, ["channels", "positive_class"], explain=MAP_SETTINGS),
        device=config["device"],
    log:
        f"{RESULTS}/logs/explain/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/explain/{{fold}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1 if config["gpu"] else 0,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.results.explain fold --config {params.config:q} --manifest {input.manifest:q}"
        " --splits {input.splits:q} --fold {wildcards.fold} --preproc-dir {params.preproc_dir:q}"
        " --model {input.model:q} --mask {input.mask:q} --out-dir {params.out_dir:q} --threads {threads}"
        " --device {params.device} > {log:q} 2>&1"


rule explain_group:
    input:
        indexes=expand(rules.explain.output.index, fold=FOLDS),
        groups=expand(rules.explain.output.group, fold=FOLDS),
        randomisation=expand(rules.explain.output.randomisation, fold=FOLDS),
        manifest=rules.exclusions.output.samples,
        predictions=rules.evaluate_summary.output.predictions,
        arrays=preprocessed("array"),
        template=rules.grid.output.template,
        mask=rules.grid.output.mask,
        atlas=[config["explain"]["atlas"][k] for k in ("image", "labels")] if config["explain"]["atlas"] else [],
        code=code("results.explain"),
    output:
        group=[group_map(f"{RESULTS}/explain", m, s) for m in METHODS for s in ("mean", "sd", "t")],
        regions=f"{RESULTS}/explain/regions.tsv",
        pngs=[group_figure(f"{RESULTS}/explain", m, v) for m in METHODS for v in ("slices", "glass")],
        extremes=f"{RESULTS}/explain/subjects_best_worst.png",
        validation=f"{RESULTS}/explain/validation.tsv",
        randomisation=f"{RESULTS}/explain/randomisation.tsv",
        # Test-retest of the model: per pair of one participant's test images (pipeline.results.retest).
        retest=f"{RESULTS}/retest_predictions.tsv",
        # Classification: each true class's group maps apart (class-<name>/) and classes.tsv.
        classes=[directory(f"{RESULTS}/explain/classes")] if config["task"] == "classification" else [],
    params:
        fold_dirs=parents_of("indexes"),
        preproc_dir=preproc_root,
        config=stage_config(config, ["channels", "explain", "target", "task"]),
        out_dir=parent_of("regions"),
    log:
        f"{RESULTS}/logs/explain/group.log",
    benchmark:
        f"{RESULTS}/benchmarks/explain/group.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.results.explain group {params.fold_dirs:q} --config {params.config:q} --manifest {input.manifest:q}"
        " --predictions {input.predictions:q} --preproc-dir {params.preproc_dir:q} --template {input.template:q}"
        " --mask {input.mask:q} --out-dir {params.out_dir:q} --retest {output.retest:q} > {log:q} 2>&1"


# The ensemble's test predictions and each test image's fold-mean maps as a BIDS derivative dataset.
rule bidsout:
    input:
        indexes=expand(rules.explain.output.index, fold=FOLDS),
        predictions=rules.evaluate_summary.output.predictions,
        manifest=rules.exclusions.output.samples,
        # The preprocessed images the maps' sidecars name as their sources: the published dataset.
        preprocessed=rules.publish.output[0] if PUBLISH else rules.ingest.output.description,
        code=code("results.bidsout"),
    output:
        directory(PREDICTIONS_DATASET),
    params:
        fold_dirs=parents_of("indexes"),
        preproc_dir=lambda wildcards, input: input.preprocessed if PUBLISH else str(Path(input.preprocessed).parent),
        config=stage_config(config, ["bids_dir", "channels", "target", "task"], explain={"methods": METHODS}),
    log:
        f"{RESULTS}/logs/bidsout.log",
    benchmark:
        f"{RESULTS}/benchmarks/bidsout.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.results.bidsout {params.fold_dirs:q} --config {params.config:q} --predictions {input.predictions:q}"
        " --manifest {input.manifest:q} --preproc-dir {params.preproc_dir:q} --out-dir {output:q} > {log:q} 2>&1"
