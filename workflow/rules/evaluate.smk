rule evaluate:
    input:
        manifest=rules.exclusions.output.samples,
        splits=f"{RESULTS}/splits.tsv",
        model=FOLD_MODEL,
        choice=FOLD_CHOICE,
        arrays=preprocessed("array"),
        labels=preprocessed("label_array") if SEGMENTATION else [],
        code=code("results.evaluate"),
    output:
        predictions=f"{RESULTS}/evaluate/{{fold}}/predictions.tsv",
        metrics=f"{RESULTS}/evaluate/{{fold}}/metrics.json",
        # Segmentation: the predicted label maps (template and native grid) of the validation and test images.
        labels=[directory(f"{RESULTS}/evaluate/{{fold}}/labels")] if SEGMENTATION else [],
    params:
        preproc_dir=preproc_root,
        out_dir=parent_of("metrics"),
        config=stage_config(config, ["channels", "positive_class"]),
        device=config["device"],
    log:
        f"{RESULTS}/logs/evaluate/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{fold}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1 if config["gpu"] else 0,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.results.evaluate fold --config {params.config:q} --manifest {input.manifest:q}"
        " --splits {input.splits:q} --fold {wildcards.fold} --preproc-dir {params.preproc_dir:q}"
        " --model {input.model:q} --out-dir {params.out_dir:q} --device {params.device} > {log:q} 2>&1"


rule evaluate_summary:
    input:
        metrics=expand(rules.evaluate.output.metrics, fold=FOLDS),
        predictions=expand(rules.evaluate.output.predictions, fold=FOLDS),
        excluded=rules.exclusions.output.excluded,
        labels=expand(rules.evaluate.output.labels, fold=FOLDS),
        # Regression and classification: each fold's linear baseline and training diagnostics.
        linear=[] if SEGMENTATION else expand(rules.linear.output.metrics, fold=FOLDS),
        linear_predictions=[] if SEGMENTATION else expand(rules.linear.output.predictions, fold=FOLDS),
        diagnostics=[] if SEGMENTATION else expand(f"{WORK}/train/{{fold}}/diagnostics.json", fold=FOLDS),
        code=code("results.evaluate"),
    output:
        table=f"{RESULTS}/evaluate/metrics.tsv",
        predictions=f"{RESULTS}/evaluate/predictions.tsv",
        metrics=f"{RESULTS}/evaluate/metrics.json",
        plot=f"{RESULTS}/evaluate/performance.png",
        labels=[directory(f"{RESULTS}/evaluate/labels")] if SEGMENTATION else [],
        comparison=[] if SEGMENTATION else f"{RESULTS}/evaluate/comparison.tsv",
        diagnostics=[] if SEGMENTATION else f"{RESULTS}/evaluate/diagnostics.json",
    params:
        fold_dirs=parents_of("metrics"),
        out_dir=parent_of("metrics"),
        linear_dirs=parents_of("linear"),
        train_dirs=parents_of("diagnostics"),
    log:
        f"{RESULTS}/logs/evaluate/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/summary.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.results.evaluate summary {params.fold_dirs:q} --excluded {input.excluded:q}"
        " --linear {params.linear_dirs:q} --train {params.train_dirs:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
