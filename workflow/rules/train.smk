rule train:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        splits=f"{RESULTS}/splits.tsv",
        targets=f"{RESULTS}/targets.json",
        arrays=preprocessed("array"),
        code=source("train", "models", "augment", "sampler", "data"),
    output:
        model=f"{RESULTS}/train/{{fold}}/model.pt",
        history=f"{RESULTS}/train/{{fold}}/history.tsv",
        hyperparameters=f"{RESULTS}/train/{{fold}}/hyperparameters.json",
    params:
        preproc_dir=preproc_root,
        channels=CHANNELS,
        out_dir=parent_of("model"),
        target=config["target"],
        task=config["task"],
        hyperparameters=json.dumps(config["train"]),
    log:
        f"{RESULTS}/logs/train/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{fold}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1 if config["gpu"] else 0,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.train --manifest {input.manifest:q} --splits {input.splits:q} --fold {wildcards.fold}"
        " --channels {params.channels} --preproc-dir {params.preproc_dir:q} --target {params.target:q}"
        " --task {params.task} --targets {input.targets:q} --hyperparameters {params.hyperparameters:q} --out-dir {params.out_dir:q}"
        " --threads {threads} > {log:q} 2>&1"
