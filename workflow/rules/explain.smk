rule explain:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        splits=f"{RESULTS}/splits.tsv",
        model=f"{RESULTS}/train/model.pt",
        arrays=preprocessed("array"),
        template=rules.grid.output.template,
        mask=rules.grid.output.mask,
        code=source("explain"),
    output:
        index=f"{RESULTS}/explain/maps.tsv",
        maps=directory(f"{RESULTS}/explain/maps"),
        occlusion=f"{RESULTS}/explain/group_space-{SPACE}_desc-occlusion_mean.nii.gz",
        gradient=f"{RESULTS}/explain/group_space-{SPACE}_desc-gradient_mean.nii.gz",
        pngs=expand(
            f"{RESULTS}/explain/group_desc-{{method}}_{{view}}.png",
            method=["occlusion", "gradient"],
            view=["slices", "glass"],
        ),
    params:
        preproc_dir=preproc_root,
        out_dir=parent_of("index"),
        window=config["explain"]["window"],
        stride=config["explain"]["stride"],
    log:
        f"{RESULTS}/logs/explain.log",
    benchmark:
        f"{RESULTS}/benchmarks/explain.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1 if config["gpu"] else 0,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.explain --manifest {input.manifest:q} --splits {input.splits:q}"
        " --preproc-dir {params.preproc_dir:q} --model {input.model:q} --template {input.template:q}"
        " --mask {input.mask:q} --window {params.window} --stride {params.stride}"
        " --out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"
