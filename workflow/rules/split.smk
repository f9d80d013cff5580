rule split:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        code=source("split"),
    output:
        f"{RESULTS}/splits.tsv",
    params:
        target=config["target"],
        task=config["task"],
        test=config["split"]["test"],
        val=config["split"]["val"],
        bins=config["split"]["bins"],
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
        " --test {params.test} --val {params.val} --bins {params.bins} --seed {params.seed}"
        " --out {output:q} > {log:q} 2>&1"
