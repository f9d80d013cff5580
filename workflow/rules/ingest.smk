checkpoint ingest:
    input:
        tables=ingest_tables,
        code=code("intake.ingest"),
    output:
        manifest=f"{RESULTS}/manifest.tsv",
        report=f"{RESULTS}/ingest_report.tsv",
        targets=f"{RESULTS}/targets.json",
        # The preprocessed images' folder as a BIDS-Derivatives dataset (pipeline.intake.derivatives).
        description=f"{PREPROC}/dataset_description.json",
        bidsignore=f"{PREPROC}/.bidsignore",
    params:
        config=stage_config(
            config,
            ["bids_dir", "bids_filters", "channels", "sessions", "runs", "participants", "target_source",
             "target_fallback", "label_image", "brain_mask", "non_bids", "check_data", "image_limits", "on_error"],
            positive_class=None if APPLY else config["positive_class"],
            target=None if APPLY else config["target"],  # apply mode selects images only: no target
            task=SPLIT_TASK,
        ),
        # Not an output: Snakemake would delete it before each run. Index and header checks are
        # reused from here while the files they describe are unchanged.
        cache=f"{WORK}/ingest_cache",
        derivatives=lambda w, output: output.description.rsplit("/", 1)[0],  # PREPROC
        # Adding, removing or resizing a file of the dataset reruns ingestion (touching does not).
        files=ingest_fingerprint(),
    log:
        f"{RESULTS}/logs/ingest.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.intake.ingest --config {params.config:q} --cache-dir {params.cache:q}"
        " --manifest {output.manifest:q} --report {output.report:q} --targets {output.targets:q}"
        " --derivatives {params.derivatives:q} > {log:q} 2>&1"


# The input dataset through bids-validator-deno (config bids_validation): a summary and a log,
# never a stop. Its own job, not part of ingest's: turning it off or on never reruns ingest and what follows.
rule bidsvalidation:
    input:
        code=code("intake.bidsvalidation"),
    output:
        summary=f"{RESULTS}/bids_validation.json",
    params:
        config=stage_config(config, ["bids_dir", "non_bids", "bids_validation"]),
        # Adding, removing or resizing a file of the dataset validates it again.
        files=ingest_fingerprint(),
    log:
        f"{RESULTS}/logs/bidsvalidation.log",
    benchmark:
        f"{RESULTS}/benchmarks/bidsvalidation.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.intake.bidsvalidation --config {params.config:q} --out {output.summary:q} > {log:q} 2>&1"
