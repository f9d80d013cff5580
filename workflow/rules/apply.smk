# Apply mode (config `apply`): a fetched model package predicts for, and explains, every ingested image;
# a segmentation package labels every image instead (template and native grid; no explanation maps).
# `apply.maps: false` (--maps none) predicts only; `apply.calibration` (--calibrate-on) recalibrates
# a regression package's predictions to this site (pipeline.sharing.calibrate).
# Every stage writes in the work folder (RESULTS, config work_dir); the output folder (OUTPUT, config
# results_dir) receives one BIDS derivative dataset (rule applyout) and the report.
PACKAGE = APPLY["package"]
PACKAGE_INPUT = f"{PACKAGE}/checksums.sha256"
PREDICTIONS = f"{RESULTS}/predictions.tsv"
MAPS = APPLY.get("maps", True) and not SEGMENTATION
CALIBRATION = APPLY.get("calibration")


if SEGMENTATION:

    rule predict_labels:
        input:
            manifest=rules.exclusions.output.samples,
            arrays=preprocessed("array"),
            # With config label_image the maps are scored against the preprocessed and the native label images.
            labels=preprocessed("label_array") if LABEL else [],
            package=PACKAGE_INPUT,
            code=code("sharing.predict"),
        output:
            predictions=PREDICTIONS,
            labels=directory(f"{RESULTS}/labels"),
            folds=expand(f"{RESULTS}/predict/{{fold}}/predictions.tsv", fold=PACKAGE_SPEC["folds"]),
            fold_labels=[directory(f"{RESULTS}/predict/{fold}/labels") for fold in PACKAGE_SPEC["folds"]],
        params:
            preproc_dir=preproc_root,
            config=stage_config(config, ["apply", "channels", "label_image"]),
            out_dir=lambda wildcards, output: str(Path(output.folds[0]).parent.parent),
            device=config["device"],
        log:
            f"{RESULTS}/logs/predict_labels.log",
        benchmark:
            f"{RESULTS}/benchmarks/predict_labels.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=60,
            gpu=1 if config["gpu"] else 0,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.sharing.predict labels --config {params.config:q} --manifest {input.manifest:q}"
            " --preproc-dir {params.preproc_dir:q} --out-dir {params.out_dir:q}"
            " --predictions {output.predictions:q} --device {params.device} > {log:q} 2>&1"

else:

    rule predict:
        input:
            manifest=rules.exclusions.output.samples,
            arrays=preprocessed("array"),
            package=PACKAGE_INPUT,
            code=code("sharing.predict"),
        output:
            predictions=PREDICTIONS,
            folds=expand(f"{RESULTS}/predict/{{fold}}/predictions.tsv", fold=PACKAGE_SPEC["folds"]),
        params:
            preproc_dir=preproc_root,
            config=stage_config(config, ["apply", "channels"]),
            out_dir=lambda wildcards, output: str(Path(output.folds[0]).parent.parent),
            device=config["device"],
        log:
            f"{RESULTS}/logs/predict.log",
        benchmark:
            f"{RESULTS}/benchmarks/predict.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
            gpu=1 if config["gpu"] else 0,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.sharing.predict predictions --config {params.config:q} --manifest {input.manifest:q}"
            " --preproc-dir {params.preproc_dir:q} --out-dir {params.out_dir:q}"
            " --predictions {output.predictions:q} --device {params.device} > {log:q} 2>&1"


    rule predict_maps:
        input:
            manifest=rules.exclusions.output.samples,
            arrays=preprocessed("array"),
            mask=rules.grid.output.mask,
            template=rules.grid.output.template,
            package=PACKAGE_INPUT,
            code=code("sharing.predict"),
        output:
            index=f"{RESULTS}/explain/maps.tsv",
            maps=directory(f"{RESULTS}/explain/maps"),
            group=[group_map(f"{RESULTS}/explain", m, s) for m in METHODS for s in ("mean", "sd", "t")],
            pngs=[group_figure(f"{RESULTS}/explain", m, v) for m in METHODS for v in ("slices", "glass")],
        params:
            preproc_dir=preproc_root,
            config=stage_config(config, ["apply", "channels"], explain=MAP_SETTINGS),
            out_dir=parent_of("index"),
            device=config["device"],
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
            "python -m pipeline.sharing.predict maps --config {params.config:q} --manifest {input.manifest:q}"
            " --preproc-dir {params.preproc_dir:q} --mask {input.mask:q} --template {input.template:q}"
            " --out-dir {params.out_dir:q} --threads {threads} --device {params.device} > {log:q} 2>&1"


if CALIBRATION:

    rule calibrate:
        input:
            predictions=PREDICTIONS,
            table=CALIBRATION["table"],
            code=code("sharing.calibrate"),
        output:
            summary=f"{RESULTS}/calibration.json",
            predictions=f"{RESULTS}/predictions_calibrated.tsv",
        params:
            column=CALIBRATION["column"],
            participants=CALIBRATION.get("participants", []),
        log:
            f"{RESULTS}/logs/calibrate.log",
        benchmark:
            f"{RESULTS}/benchmarks/calibrate.tsv"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.sharing.calibrate --predictions {input.predictions:q} --table {input.table:q}"
            " --column {params.column:q} --participants {params.participants:q} --out-json {output.summary:q}"
            " --out-tsv {output.predictions:q} > {log:q} 2>&1"


if not SEGMENTATION:

    rule predict_retest:
        # Test-retest of the model: per pair of one participant's images, the predictions' difference
        # and the maps' similarity (pipeline.results.retest).
        input:
            predictions=PREDICTIONS,
            index=rules.predict_maps.output.index if MAPS else [],
            mask=rules.grid.output.mask,
            code=code("sharing.predict"),
        output:
            f"{RESULTS}/retest_predictions.tsv",
        params:
            maps=lambda wildcards, input: ["--maps-dir", str(Path(input.index).parent)] if input.index else [],
        log:
            f"{RESULTS}/logs/predict_retest.log",
        benchmark:
            f"{RESULTS}/benchmarks/predict_retest.tsv"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.sharing.predict retest --predictions {input.predictions:q} {params.maps:q}"
            " --mask {input.mask:q} --out {output:q} > {log:q} 2>&1"


rule predict_report:
    input:
        predictions=PREDICTIONS,
        # Test-retest: of preprocessing (qc's retest.tsv) and of the model (not for a segmentation package).
        retest=[rules.qc.output.retest] + ([] if SEGMENTATION else [rules.predict_retest.output[0]]),
        pngs=rules.predict_maps.output.pngs if MAPS else [],
        calibration=rules.calibrate.output.summary if CALIBRATION else [],
        qc=preprocessed("qc"),
        package=PACKAGE_INPUT,
        code=code("sharing.predict"),
    output:
        report(f"{OUTPUT}/report.html", caption="../report/apply.rst", category="Predictions"),
    params:
        explain=lambda wildcards, input: ["--explain-dir", str(Path(input.pngs[0]).parent)] if input.pngs else [],
        calibration=lambda wildcards, input: ["--calibration", input.calibration] if input.calibration else [],
        qc_shown=lambda wildcards, input: input.qc[:4],
        config=stage_config(config, list(config)),
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
        "python -m pipeline.sharing.predict report --config {params.config:q} --predictions {input.predictions:q}"
        " {params.explain:q} {params.calibration:q} --qc {params.qc_shown:q} --retest {input.retest:q}"
        " --out {output:q} > {log:q} 2>&1"


rule applyout:
    # The output folder as one BIDS derivative dataset (pipeline.sharing.applyout): the preprocessed
    # images, the maps or label maps with BIDS names, participants and scans tables of the predictions.
    input:
        manifest=rules.exclusions.output.samples,
        predictions=rules.calibrate.output.predictions if CALIBRATION else PREDICTIONS,
        index=rules.predict_maps.output.index if MAPS else [],
        images=preprocessed(f"image_{CHANNELS[0]}"),
        package=PACKAGE_INPUT,
        code=code("sharing.applyout"),
    output:
        description=f"{OUTPUT}/dataset_description.json",
        participants=f"{OUTPUT}/participants.tsv",
    params:
        config=stage_config(config, ["apply", "bids_dir", "channels", "explain"]),
        maps=lambda wildcards, input: ["--maps-index", input.index] if input.index else [],
        preproc_dir=PREPROC,
        out_dir=parent_of("description"),
    log:
        f"{RESULTS}/logs/applyout.log",
    benchmark:
        f"{RESULTS}/benchmarks/applyout.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.sharing.applyout --config {params.config:q} --manifest {input.manifest:q}"
        " --preproc-dir {params.preproc_dir:q} --predictions {input.predictions:q} {params.maps:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
