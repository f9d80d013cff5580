# Apply mode (config `apply`): a fetched model package predicts for, and explains, every ingested image.
PACKAGE = APPLY["package"]
PACKAGE_INPUT = f"{PACKAGE}/checksums.sha256"


rule predict:
    input:
        manifest=rules.exclusions.output.samples,
        arrays=preprocessed("array"),
        package=PACKAGE_INPUT,
        code=code("predict"),
    output:
        predictions=f"{RESULTS}/predictions.tsv",
        folds=expand(f"{RESULTS}/predict/{{fold}}/predictions.tsv", fold=PACKAGE_SPEC["folds"]),
    params:
        package=PACKAGE,
        preproc_dir=preproc_root,
        channels=CHANNELS,
        out_dir=lambda wildcards, output: str(Path(output.folds[0]).parent.parent),
    log:
        f"{RESULTS}/logs/predict.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.predict predictions --package {params.package:q} --manifest {input.manifest:q}"
        " --preproc-dir {params.preproc_dir:q} --channels {params.channels} --out-dir {params.out_dir:q}"
        " --predictions {output.predictions:q} > {log:q} 2>&1"


rule predict_maps:
    input:
        manifest=rules.exclusions.output.samples,
        arrays=preprocessed("array"),
        mask=rules.grid.output.mask,
        template=rules.grid.output.template,
        package=PACKAGE_INPUT,
        code=code("predict"),
    output:
        index=f"{RESULTS}/explain/maps.tsv",
        maps=directory(f"{RESULTS}/explain/maps"),
        group=[group_map(f"{RESULTS}/explain", m, s) for m in METHODS for s in ("mean", "sd", "t")],
        pngs=expand(f"{RESULTS}/explain/group_desc-{{method}}_{{view}}.png", method=METHODS, view=["slices", "glass"]),
    params:
        package=PACKAGE,
        preproc_dir=preproc_root,
        channels=CHANNELS,
        methods=METHODS,
        settings=json.dumps(SETTINGS),
        target_class=f"--target-class {shlex.quote(EXPLAIN['target_class'])}" if EXPLAIN["target_class"] else "",
        out_dir=parent_of("index"),
    log:
        f"{RESULTS}/logs/predict_maps.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict_maps.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1 if config["gpu"] else 0,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.predict maps --package {params.package:q} --manifest {input.manifest:q}"
        " --preproc-dir {params.preproc_dir:q} --channels {params.channels} --mask {input.mask:q}"
        " --template {input.template:q} --methods {params.methods} --settings {params.settings:q}"
        " {params.target_class} --out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"


rule predict_report:
    input:
        predictions=rules.predict.output.predictions,
        pngs=rules.predict_maps.output.pngs,
        qc=preprocessed("qc"),
        package=PACKAGE_INPUT,
        code=code("predict"),
    output:
        report(f"{RESULTS}/report.html", caption="../report/apply.rst", category="Predictions"),
    params:
        package=PACKAGE,
        name=APPLY["name"] or PACKAGE,
        explain_dir=lambda wildcards, input: str(Path(input.pngs[0]).parent),
        methods=METHODS,
        qc_shown=lambda wildcards, input: input.qc[:4],
        config=json.dumps(config),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.predict report --package {params.package:q} --name {params.name:q}"
        " --predictions {input.predictions:q} --explain-dir {params.explain_dir:q} --methods {params.methods}"
        " --qc {params.qc_shown:q} --config {params.config:q} --out {output:q} > {log:q} 2>&1"
