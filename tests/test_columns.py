"""Data dictionaries: every TSV written through atomic.to_csv gets a BIDS-style JSON sidecar from the
one registry of column meanings (pipeline.common.columns), and a column without an entry fails.

Every test of the suite that writes a TSV through the real writers also checks its columns: an
undocumented one raises ``Undocumented`` there (pyproject.toml turns the warning into an error);
tests/test_workflow.py checks the sidecars of a whole study's outputs."""

import json
import re

import pandas as pd
import pytest

from pipeline.common import atomic, columns
from pipeline.intake import qc, split
from pipeline.results import metrics
from pipeline.results.evaluate import summarise

from test_evaluate import fold_dir


def test_every_family_matches_its_example_and_describes_it():
    for family in columns.FAMILIES:
        assert re.fullmatch(family.pattern, family.example), family.pattern
        entry = columns.lookup(family.example, metrics.COLUMNS)
        assert entry is not None and entry.long_name and entry.description, family.example


def test_every_metric_of_the_registry_has_its_entry_and_its_interval_and_corrected_forms():
    for task in metrics.METRICS.values():
        for metric in task:
            for name in (metric.name, f"{metric.name}_ci_low", f"{metric.name}_ci_high",
                         f"corrected_{metric.name}_ci_high"):
                assert columns.lookup(name, metrics.COLUMNS) is not None, name
            assert metric.long_name in columns.lookup(f"{metric.name}_ci_low", metrics.COLUMNS).long_name
    # Without the metrics' entries (a writer that did not pass them) the metric is not documented.
    assert columns.lookup("roc_auc") is None and columns.lookup("roc_auc_ci_low") is None


def test_an_unknown_column_is_an_error_in_the_suite_and_marked_in_the_sidecar(tmp_path):
    frame = pd.DataFrame({"image_id": ["sub-1"], "mystery_score": [0.5]})
    with pytest.raises(columns.Undocumented, match="mystery_score"):
        atomic.to_csv(frame, tmp_path / "t.tsv", sep="\t", index=False)
    with pytest.warns(columns.Undocumented):
        atomic.to_csv(frame, tmp_path / "t.tsv", sep="\t", index=False)
    sidecar = json.loads((tmp_path / "t.json").read_text())
    assert sidecar["mystery_score"]["Description"] == columns.UNDOCUMENTED
    assert sidecar["image_id"]["LongName"] == "Image"
    assert columns.undocumented(["image_id", "mystery_score", "p_AD", "dice_wm"]) == ["mystery_score"]


def test_only_tsvs_get_a_dictionary_and_the_writers_entries_come_first(tmp_path):
    frame = pd.DataFrame({"participant_id": ["sub-1"], "age": [30.0]})
    atomic.to_csv(frame, tmp_path / "t.csv", index=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    own = {"age": columns.Column("Age", "Age at the scan.", units="year")}
    atomic.to_csv(frame, tmp_path / "t.tsv", sep="\t", index=False, meanings=own)
    assert json.loads((tmp_path / "t.json").read_text())["age"] == {"LongName": "Age", "Description": "Age at the scan.",
                                                                     "Units": "year"}


def test_evaluation_tables_have_every_column_described_beside_them(tmp_path):
    """The summary's metrics.tsv (its dictionary metrics_dictionary.json: metrics.json is the summary),
    metrics_images.tsv and the ensemble's predictions.tsv, through the real writer."""
    folds = [fold_dir(tmp_path, "fold-1", [0.0, 22.0, 38.0, 64.0, 76.0]),
             fold_dir(tmp_path, "fold-2", [0.0, 18.0, 42.0, 60.0, 84.0])]
    out = tmp_path / "summary"
    summarise(folds, out)
    assert "ensemble" in json.loads((out / "metrics.json").read_text())  # the summary is untouched
    for name in ("metrics.tsv", "metrics_images.tsv", "predictions.tsv"):
        header = pd.read_csv(out / name, sep="\t", nrows=0).columns.tolist()
        sidecar = json.loads(columns.sidecar_of(out / name).read_text())
        assert list(sidecar) == header, name
        assert all(e["Description"] != columns.UNDOCUMENTED and e["LongName"] for e in sidecar.values()), name
    described = json.loads((out / "metrics_dictionary.json").read_text())
    for internal in ("train_mean", "baseline_mae", "mae_ratio_to_baseline", "corrected_mae", "best_epoch",
                     "mae_ci_low"):
        assert internal in described
    assert described["mae"]["LongName"] == "Mean absolute error" and "Lower is better" in described["mae"]["Description"]
    assert described["mae_ci_low"]["LongName"] == "Mean absolute error, 95 % interval low"
    assert "bias correction" in described["corrected_mae"]["Description"]
    assert "training mean" in described["mae_ratio_to_baseline"]["Description"]


def test_split_tables_describe_the_folds_with_levels_and_the_class_counts(tmp_path):
    rows = [{"image_id": f"sub-{i:02d}", "participant_id": f"sub-{i:02d}", "group": "AD" if i % 2 else "CN"}
            for i in range(20)]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.tsv", sep="\t", index=False)
    config = {"target": "group", "task": "classification",
              "split": {"test": 0.2, "folds": 2, "val": 0.2, "seed": 0, "bins": 5, "stratify": [], "method": "stable"}}
    split.main([str(tmp_path / "manifest.tsv"), "--config", json.dumps(config), "--out", str(tmp_path / "splits.tsv"),
                "--balance", str(tmp_path / "split_balance.tsv")])
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert list(splits) == ["image_id", "participant_id", "fold-1", "fold-2"]
    assert set(splits["fold-2"]["Levels"]) == {"train", "val", "test"}
    balance = json.loads((tmp_path / "split_balance.json").read_text())
    assert balance["AD"]["LongName"] == "Images of class AD" and "group is CN" in balance["CN"]["Description"]
    assert balance["split"]["Levels"] == columns.SPLITS


def test_qc_table_has_absolute_paths_and_its_dictionary_states_the_study_threshold(tmp_path, monkeypatch):
    """The workflow passes the derivatives folder relative to the run folder: qc_png is absolute anyway,
    like ``file``."""
    from test_qc import write_qc_study

    write_qc_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    qc.main(["--config", json.dumps({"channels": {"T1w": {"suffix": "T1w"}}, "qc_min": 0.5}), "--manifest",
             "manifest.tsv", "--preproc-dir", "derivatives", "--excluded", "excluded.tsv", "--out", "qc.tsv"])
    table = pd.read_csv(tmp_path / "qc.tsv", sep="\t", keep_default_na=False)
    assert all(p.startswith("/") for p in [*table["file"], *table["qc_png"]])
    dictionary = json.loads((tmp_path / "qc.json").read_text())
    assert list(dictionary) == qc.COLUMNS
    assert "This study's threshold: 0.5 (config preprocess.qc_min)" in dictionary[qc.GATED]["Description"]
    assert dictionary["excluded"]["Levels"] == {"yes": "yes", "no": "no"}
    assert "null in this study" in qc.threshold(None)[qc.GATED].description


def test_a_carried_table_keeps_the_input_datasets_own_descriptions(tmp_path):
    from pipeline.intake.ingest import table_meanings

    (tmp_path / "participants.json").write_text(json.dumps(
        {"age": {"LongName": "Age at scan", "Description": "Age in years.", "Units": "year"},
         "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}}}))
    manifest = pd.DataFrame(columns=["image_id", "participant_id", "session", "subdir", "path", "path_T2w", "age",
                                     "sex", "site"])
    meanings = table_meanings(manifest, {"target": "age", "source": "participants.tsv"}, tmp_path)
    assert sorted(meanings) == ["age", "sex", "site"]
    assert meanings["age"].units == "year" and meanings["age"].description.startswith("The study's target")
    assert meanings["sex"].levels == {"F": "female", "M": "male"}
    assert "participants.tsv" in meanings["site"].description
    assert columns.undocumented(manifest.columns, meanings) == []


def test_metrics_tsv_dictionary_does_not_overwrite_the_summary():
    assert columns.sidecar_of("results/evaluate/metrics.tsv").name == "metrics_dictionary.json"
    assert columns.sidecar_of("results/evaluate/metrics_images.tsv").name == "metrics_images.json"
    assert columns.sidecar_of("results/qc.tsv").name == "qc.json"


def test_index_names_are_written_columns():
    frame = pd.DataFrame({"mae": [1.0]}, index=pd.Index(["ensemble"], name="model"))
    assert atomic.written_columns(frame, {"sep": "\t"}) == ["model", "mae"]
    assert atomic.written_columns(frame, {"index": False}) == ["mae"]


def test_rewording_a_description_reruns_no_job():
    """The registry is imported by every stage (atomic.to_csv), but left out of the jobs' code
    fingerprints (pipeline.common.codegraph.DESCRIPTIVE): only its tables' dictionaries depend on it."""
    from pipeline.common import codegraph

    registry = codegraph.module_file("pipeline.common.columns")
    assert registry in codegraph.code_of("pipeline.intake.preprocess")
    assert "common/columns.py" not in codegraph.fingerprint("pipeline.intake.preprocess")
    assert "common/atomic.py" in codegraph.fingerprint("pipeline.intake.preprocess")
