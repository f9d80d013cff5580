rule split:
    input:
        manifest=rules.exclusions.output.samples,
        code=code("split"),
    output:
        splits=f"{RESULTS}/splits.tsv",
        balance=f"{RESULTS}/split_balance.tsv",
    params:
        target=config["target"],
        task=SPLIT_TASK,
        test=config["split"]["test"],
        folds=config["split"]["folds"],
        val=config["split"]["val"],
        bins=config["split"]["bins"],
        stratify=config["split"]["stratify"],
        seed=config["split"]["seed"],
    log:
        f"{RESULTS}/logs/split.log",
    benchmark:
        f"{RESULTS}/benchmarks/split.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.split {input.manifest:q} --target {params.target:q} --task {params.task}"
        " --test {params.test} --folds {params.folds} --val {params.val} --bins {params.bins}"
        " --stratify {params.stratify:q} --seed {params.seed} --out {output.splits:q}"
        " --balance {output.balance:q} > {log:q} 2>&1"
