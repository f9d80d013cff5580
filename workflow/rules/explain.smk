rule explain:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        splits=f"{RESULTS}/splits.tsv",
        model=rules.train.output.model,
        arrays=preprocessed("array"),
        mask=rules.grid.output.mask,
        code=source("explain", "paths"),
    output:
        index=f"{RESULTS}/explain/{{fold}}/maps.tsv",
        maps=directory(f"{RESULTS}/explain/{{fold}}/maps"),
        group=[group_map(f"{RESULTS}/explain/{{fold}}", m) for m in ("occlusion", "gradient")],
    params:
        preproc_dir=preproc_root,
        channels=CHANNELS,
        out_dir=parent_of("index"),
        window=config["explain"]["window"],
        stride=config["explain"]["stride"],
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
        "python -m pipeline.explain fold --manifest {input.manifest:q} --splits {input.splits:q}"
        " --fold {wildcards.fold} --channels {params.channels} --preproc-dir {params.preproc_dir:q}"
        " --model {input.model:q} --mask {input.mask:q} --window {params.window} --stride {params.stride}"
        " --out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"


rule explain_folds:
    input:
        groups=expand(rules.explain.output.group, fold=FOLDS),
        template=rules.grid.output.template,
        code=source("explain", "paths"),
    output:
        group=[group_map(f"{RESULTS}/explain", m) for m in ("occlusion", "gradient")],
        pngs=expand(
            f"{RESULTS}/explain/group_desc-{{method}}_{{view}}.png",
            method=["occlusion", "gradient"],
            view=["slices", "glass"],
        ),
    params:
        fold_dirs=parents_of("groups"),
        out_dir=parent_of("group"),
    log:
        f"{RESULTS}/logs/explain/group.log",
    benchmark:
        f"{RESULTS}/benchmarks/explain/group.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.explain group {params.fold_dirs:q} --template {input.template:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
