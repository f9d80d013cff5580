checkpoint ingest:
    input:
        participants=f"{BIDS}/participants.tsv",
        code=source("ingest"),
    output:
        manifest=f"{RESULTS}/manifest.tsv",
        report=f"{RESULTS}/ingest_report.tsv",
    params:
        bids_dir=lambda w, input: str(Path(input.participants).parent),
        target=config["target"],
        task=config["task"],
        filters=json.dumps(config["bids_filters"]),
        include=config["participants"]["include"],
        exclude=config["participants"]["exclude"],
        database=lambda w, output: str(Path(output.manifest).parent / "bids_db"),
        # Adding, removing or resizing a file of the dataset reruns ingestion (touching does not).
        files=tree_fingerprint(BIDS, mtimes=False) if Path(BIDS).is_dir() else "",
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
        "python -m pipeline.ingest {params.bids_dir:q} --target {params.target:q} --task {params.task}"
        " --filters {params.filters:q} --include {params.include:q} --exclude {params.exclude:q}"
        " --database-dir {params.database:q} --manifest {output.manifest:q} --report {output.report:q}"
        " > {log:q} 2>&1"
