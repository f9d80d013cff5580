rule split:
    input:
        manifest=rules.exclusions.output.samples,
        code=code("intake.split"),
    output:
        splits=f"{RESULTS}/splits.tsv",
        balance=f"{RESULTS}/split_balance.tsv",
    params:
        config=stage_config(config, ["target", "split"], task=SPLIT_TASK),
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
        "python -m pipeline.intake.split {input.manifest:q} --config {params.config:q} --out {output.splits:q}"
        " --balance {output.balance:q} > {log:q} 2>&1"
