rule export:
    input:
        models=expand(FOLD_MODEL, fold=FOLDS),
        histories=expand(FOLD_HISTORY, fold=FOLDS),
        fold_metrics=expand(rules.evaluate.output.metrics, fold=FOLDS),
        summary=rules.evaluate_summary.output.metrics,
        manifest=rules.exclusions.output.samples,
        splits=rules.split.output.splits,
        arrays=preprocessed("array"),
        template=rules.grid.output.template,
        mask=rules.grid.output.mask,
        code=code("sharing.export"),
    output:
        files=[f"{RESULTS}/package/model/{name}" for name in package_files(FOLDS)],
        archive=f"{RESULTS}/package/model.tar.gz",
    params:
        train_dirs=parents_of("models"),
        evaluate_dirs=parents_of("fold_metrics"),
        preproc_dir=preproc_root,
        out_dir=parent_of("files"),
        config=stage_config(config, ["package"], recipe=RECIPE, explain={"methods": METHODS, **SETTINGS}),
    log:
        f"{RESULTS}/logs/export.log",
    benchmark:
        f"{RESULTS}/benchmarks/export.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.sharing.export --train-dirs {params.train_dirs:q} --evaluate-dirs {params.evaluate_dirs:q}"
        " --summary {input.summary:q} --manifest {input.manifest:q} --splits {input.splits:q}"
        " --preproc-dir {params.preproc_dir:q} --template {input.template:q} --mask {input.mask:q}"
        " --config {params.config:q}"
        " --out-dir {params.out_dir:q} --archive {output.archive:q} > {log:q} 2>&1"
