rule grid:
    input:
        code=code("intake.grid"),
        package=[f"{APPLY['package']}/checksums.sha256"] if APPLY else [],
    output:
        template=f"{GRID}/tpl-{SPACE}_res-{config['preprocess']['resolution']}_T1w.nii.gz",
        mask=f"{GRID}/tpl-{SPACE}_res-{config['preprocess']['resolution']}_desc-brain_mask.nii.gz",
    params:
        # Apply mode copies the package's grid: new images meet the very grid of the training images.
        config=stage_config(config, ["preprocess"], package=APPLY["package"] if APPLY else None),
    log:
        f"{RESULTS}/logs/grid.log",
    benchmark:
        f"{RESULTS}/benchmarks/grid.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.intake.grid --config {params.config:q} --template {output.template:q} --mask {output.mask:q}"
        " > {log:q} 2>&1"


rule preprocess:
    input:
        images=source_images,
        label=source_label,
        brain_mask=source_brain_mask,
        template=rules.grid.output.template,
        mask=rules.grid.output.mask,
        code=code("intake.preprocess"),
    output:
        **preprocessed_paths(PREPROC, "{subdir}", "{image}", CHANNELS, LABEL),
        # With on_error: continue a failed sample gets one row here (and empty files above).
        excluded=exclusion_record(PREPROC, "{subdir}", "{image}"),
    params:
        out_dir=lambda w, output: output.array[: output.array.index(f"/{w.subdir}/anat/")],
        config=stage_config(config, ["preprocess", "channels", "on_error"]),
        bids_dir=BIDS,  # the sidecars' Sources are BIDS URIs into it
    log:
        f"{RESULTS}/logs/preprocess/{{subdir}}/{{image}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/preprocess/{{subdir}}/{{image}}.tsv"
    # One ITK thread: registration is reproducible only single-threaded (see pipeline.intake.preprocess).
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    group:
        "preprocess"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.intake.preprocess {input.images:q} --config {params.config:q} --template {input.template:q}"
        " --mask {input.mask:q} --out-dir {params.out_dir:q} --bids-dir {params.bids_dir:q} --subdir {wildcards.subdir} --image-id {wildcards.image}"
        " --label {input.label:q} --brain-mask {input.brain_mask:q} --threads {threads} --excluded {output.excluded:q}"
        " > {log:q} 2>&1"


# Ingest's and preprocessing's exclusions, then the cohort registration QC (config qc) over every
# image preprocessing finished: one table of what is left out and why, and the samples left.
rule exclusions:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        report=f"{RESULTS}/ingest_report.tsv",
        records=exclusion_records,
        sidecars=preprocessed(f"sidecar_{CHANNELS[0]}"),
        code=code("intake.exclusions"),
    output:
        excluded=f"{RESULTS}/excluded.tsv",
        samples=f"{RESULTS}/samples.tsv",
    params:
        preproc_dir=PREPROC,
        config=stage_config(config, ["qc", "channels"]),
    log:
        f"{RESULTS}/logs/exclusions.log",
    benchmark:
        f"{RESULTS}/benchmarks/exclusions.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.intake.exclusions --ingest-report {input.report:q} --records {input.records:q}"
        " --manifest {input.manifest:q} --out {output.excluded:q} --samples {output.samples:q}"
        " --preproc-dir {params.preproc_dir:q} --config {params.config:q} > {log:q} 2>&1"


rule qc:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        excluded=rules.exclusions.output.excluded,
        sidecars=preprocessed(f"sidecar_{CHANNELS[0]}"),
        pngs=preprocessed("qc"),
        arrays=preprocessed("array"),
        mask=rules.grid.output.mask,
        code=code("intake.qc"),
    output:
        table=f"{RESULTS}/qc.tsv",
        retest=f"{RESULTS}/retest.tsv",
    params:
        preproc_dir=PREPROC,
        config=stage_config(config, ["channels"], qc_min=config["preprocess"].get("qc_min")),
    log:
        f"{RESULTS}/logs/qc.log",
    benchmark:
        f"{RESULTS}/benchmarks/qc.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.intake.qc --config {params.config:q} --manifest {input.manifest:q} --preproc-dir {params.preproc_dir:q}"
        " --excluded {input.excluded:q} --out {output.table:q} --mask {input.mask:q} --retest {output.retest:q}"
        " > {log:q} 2>&1"


if PUBLISH:

    rule publish:
        # Config work_dir: the preprocessed images as a BIDS derivative dataset in the output folder,
        # every file preprocessing wrote but the arrays (pipeline.intake.publish; hard links).
        input:
            manifest=f"{RESULTS}/manifest.tsv",
            images=preprocessed(f"image_{CHANNELS[0]}"),
            excluded=rules.exclusions.output.excluded,  # every sample's preprocessing finished
            code=code("intake.publish"),
        output:
            directory(PUBLISHED),
        params:
            preproc_dir=PREPROC,
            config=stage_config(config, ["bids_dir", "channels", "label_image"]),
        log:
            f"{RESULTS}/logs/publish.log",
        benchmark:
            f"{RESULTS}/benchmarks/publish.tsv"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.intake.publish --config {params.config:q} --manifest {input.manifest:q}"
            " --preproc-dir {params.preproc_dir:q} --out-dir {output:q} > {log:q} 2>&1"
