checkpoint ingest:
    input:
        tables=ingest_tables,
        code=code("ingest"),
    output:
        manifest=f"{RESULTS}/manifest.tsv",
        report=f"{RESULTS}/ingest_report.tsv",
        targets=f"{RESULTS}/targets.json",
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
        cache=f"{RESULTS}/ingest_cache",
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
        "python -m pipeline.ingest --config {params.config:q} --cache-dir {params.cache:q}"
        " --manifest {output.manifest:q} --report {output.report:q} --targets {output.targets:q} > {log:q} 2>&1"
