rule linear:
    """The linear baseline of one fold: ridge or L2 logistic regression on the same arrays and splits."""
    input:
        manifest=rules.exclusions.output.samples,
        splits=f"{RESULTS}/splits.tsv",
        targets=f"{RESULTS}/targets.json",
        arrays=preprocessed("array"),
        mask=rules.grid.output.mask,
        code=code("results.linear"),
    output:
        predictions=f"{RESULTS}/linear/{{fold}}/predictions.tsv",
        metrics=f"{RESULTS}/linear/{{fold}}/metrics.json",
        validation=f"{RESULTS}/linear/{{fold}}/validation.tsv",
    params:
        preproc_dir=preproc_root,
        out_dir=parent_of("metrics"),
        config=stage_config(config, ["target", "task", "channels", "linear", "positive_class"]),
    log:
        f"{RESULTS}/logs/linear/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/linear/{{fold}}.tsv"
    threads: 1
    resources:
        mem_mb=config["linear"]["memory_mb"] + 1000,
        runtime=60,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "OMP_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m pipeline.results.linear --config {params.config:q} --manifest {input.manifest:q} --splits {input.splits:q}"
        " --fold {wildcards.fold} --preproc-dir {params.preproc_dir:q} --mask {input.mask:q}"
        " --targets {input.targets:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
