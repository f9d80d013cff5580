rule evaluate:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        splits=f"{RESULTS}/splits.tsv",
        model=f"{RESULTS}/train/model.pt",
        arrays=preprocessed("array"),
        code=source("evaluate"),
    output:
        predictions=f"{RESULTS}/evaluate/predictions.tsv",
        metrics=f"{RESULTS}/evaluate/metrics.json",
        plot=f"{RESULTS}/evaluate/performance.png",
    params:
        preproc_dir=preproc_root,
        out_dir=parent_of("metrics"),
    log:
        f"{RESULTS}/logs/evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.evaluate --manifest {input.manifest:q} --splits {input.splits:q}"
        " --preproc-dir {params.preproc_dir:q} --model {input.model:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
