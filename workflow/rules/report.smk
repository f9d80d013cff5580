rule report:
    input:
        manifest=rules.exclusions.output.samples,
        exclusions=rules.exclusions.output.excluded,
        splits=rules.split.output.splits,
        balance=rules.split.output.balance,
        histories=expand(FOLD_HISTORY, fold=FOLDS),
        metrics=rules.evaluate_summary.output.table,
        summary=rules.evaluate_summary.output.metrics,
        performance=rules.evaluate_summary.output.plot,
        comparison=rules.evaluate_summary.output.comparison,
        diagnostics=rules.evaluate_summary.output.diagnostics,
        # Explanation maps are of image-level predictions: none for segmentation.
        maps=[] if SEGMENTATION else rules.explain_group.output.pngs,
        extremes=[] if SEGMENTATION else rules.explain_group.output.extremes,
        regions=[] if SEGMENTATION else rules.explain_group.output.regions,
        validation=[] if SEGMENTATION else rules.explain_group.output.validation,
        retest=[] if SEGMENTATION else rules.explain_group.output.retest,
        # Every image's registration scores, worst first; the report shows the worst rows and their QC images.
        qc=rules.qc.output.table,
        qc_pngs=preprocessed("qc"),
        code=code("results.report"),
    output:
        report(
            f"{RESULTS}/report.html",
            caption="../report/study.rst",
            category="Study",
        ),
    params:
        results=lambda wildcards, input: str(Path(input.manifest).parent),
        train_dir=lambda wildcards, input: str(Path(input.histories[0]).parents[1]),
        config=stage_config(config, list(config)),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.results.report --results {params.results:q} --train-dir {params.train_dir:q} --qc-table {input.qc:q}"
        " --config {params.config:q} --out {output:q} > {log:q} 2>&1"
