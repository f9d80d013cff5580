checkpoint ingest:
    input:
        tables=ingest_tables,
        code=code("ingest"),
    output:
        manifest=f"{RESULTS}/manifest.tsv",
        report=f"{RESULTS}/ingest_report.tsv",
        targets=f"{RESULTS}/targets.json",
    params:
        bids_dir=BIDS,
        # Apply mode selects images only: no target is needed.
        target="--no-target" if APPLY else f"--target {shlex.quote(config['target'])}",
        task=SPLIT_TASK,
        filters=json.dumps(config["bids_filters"]),
        channels=json.dumps(config["channels"]),
        sessions=config["sessions"],
        runs=config["runs"],
        target_source=config["target_source"],
        label_image=json.dumps(config["label_image"]),
        non_bids=json.dumps(config["non_bids"]),
        check_data="--check-data" if config["check_data"] else "--no-check-data",
        limits=json.dumps(config["image_limits"]),
        on_error=config["on_error"],
        include=config["participants"]["include"],
        exclude=config["participants"]["exclude"],
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
        "python -m pipeline.ingest {params.bids_dir:q} {params.target} --task {params.task}"
        " --filters {params.filters:q} --channels {params.channels:q} --sessions {params.sessions:q}"
        " --runs {params.runs:q} --target-source {params.target_source} --label-image {params.label_image:q}"
        " --non-bids {params.non_bids:q} {params.check_data} --limits {params.limits:q} --on-error {params.on_error}"
        " --include {params.include:q}"
        " --exclude {params.exclude:q} --cache-dir {params.cache:q} --manifest {output.manifest:q}"
        " --report {output.report:q} --targets {output.targets:q} > {log:q} 2>&1"
