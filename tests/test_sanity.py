"""Sanity checks of explanation maps (pipeline.results.sanity): real networks, real maps."""

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.learning.models import build_model
from pipeline.learning.sampler import ImageModel, SliceSampler
from pipeline.results import sanity
from pipeline.results.attribution import Settings


def test_blocks_cascade_from_the_output_and_randomising_changes_only_those():
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, 1, norm="batch", dropout=0).eval()
    names = list(sanity.blocks(model))
    assert names == ["features.0", "features.1", "features.2", "features.3", "head.3"]
    assert sanity.cascade(len(names)) == [1, 3, 5] and sanity.cascade(1) == [1]
    top = sanity.randomised(model, 1, seed=7)
    before, after = model.state_dict(), top.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.3") for k in changed)
    full = sanity.randomised(model, len(names), seed=7).state_dict()
    assert all(not torch.equal(before[k], full[k]) for k in before if k.endswith("weight") and before[k].ndim > 1)
    assert torch.equal(model.state_dict()["head.3.weight"], before["head.3.weight"])  # the original is untouched


def test_the_gradient_of_a_network_changes_with_its_weights_and_a_copy_of_the_image_would_not():
    """Through the real randomisation_rows: the gradient map decorrelates once every block is
    randomised (passes); a map that is the image itself would stay at ρ = 1 (fails)."""
    torch.manual_seed(1)
    model = build_model("simple_cnn", 1, 1, norm="batch", dropout=0).eval()
    x = torch.randn(1, 1, 16, 20, 16)
    brain = np.ones((16, 20, 16), bool)
    rows = pd.DataFrame(sanity.randomisation_rows(model, x, 0, ["gradient", "integrated_gradients"], Settings.of({}),
                                                  torch.zeros_like(x), False, brain, "sub-1"))
    assert set(rows["blocks_randomised"]) == {1, 3, 5} and (rows["of_blocks"] == 5).all()
    assert rows["from_block"].iloc[-1] == "features.0"
    full = rows[rows["blocks_randomised"] == 5].set_index("method")
    assert np.isfinite(full[sanity.SIMILARITIES].to_numpy()).all(), full
    assert full.at["gradient", "top5_overlap"] < 0.5 and abs(full.at["gradient", "spearman"]) < 0.5, full
    assert sanity.sanity_verdict(full.at["gradient", "top5_overlap"]).startswith("passes")
    assert sanity.sanity_verdict(0.97).startswith("fails")
    image = x[0, 0].numpy()
    assert sanity.similarities(image, 2 * image, brain) == pytest.approx(
        {"spearman": 1.0, "spearman_signed": 1.0, "top5_overlap": 1.0})
    assert sanity.similarities(image, -image, brain)["spearman_signed"] == pytest.approx(-1.0)


def test_the_top_overlap_separates_a_map_whose_strong_voxels_stay_from_one_that_follows_only_weak_ranks():
    """Adebayo et al.'s point: |map| ranks can stay correlated (every weak voxel keeps the image's
    structure) while the strongest voxels, what a reader sees, move."""
    rng = np.random.default_rng(0)
    brain = np.ones((20, 20, 20), bool)
    anatomy = rng.random((20, 20, 20))
    trained = anatomy.copy()
    trained[:8, :8, :8] += 5  # the model's strong region
    moved = anatomy.copy()
    moved[12:, 12:, 12:] += 5  # random weights: the strong region is elsewhere
    ranks, overlap = sanity.rank_correlation(trained, moved, brain), sanity.top_overlap(trained, moved, brain)
    assert ranks >= sanity.PASS_BELOW and overlap < 0.2  # |ranks| would call it "fails"
    assert sanity.top_overlap(trained, trained + 0.01 * rng.random(trained.shape), brain) > 0.9
    assert np.isnan(sanity.top_overlap(trained, np.zeros_like(trained), brain))


def test_the_reading_of_a_method_combines_its_verdicts_and_the_ground_truth():
    passes, fails = sanity.sanity_verdict(0.1), sanity.sanity_verdict(0.9)
    consistent, flagged = sanity.consistency_verdict(0.9, 2), sanity.consistency_verdict(0.1, 2)
    assert sanity.reading(passes, consistent, 8.0) == "Passes ground truth and randomisation: trust its location."
    assert sanity.reading(fails, consistent, 8.0).startswith("Lands on the true effect but fails randomisation")
    assert sanity.reading(fails, consistent, 1.1).endswith("fails randomisation: do not use it.")
    assert "no ground truth" in sanity.reading(passes, consistent, None)
    assert "do not read locations from it alone" in sanity.reading(fails, consistent, float("nan"))
    assert sanity.reading("not checked", consistent, None).startswith("Randomisation not checked")
    assert sanity.reading(passes, flagged, 8.0).endswith("depends on the training participants drawn.")


def test_the_check_reaches_the_network_inside_a_slice_model():
    torch.manual_seed(2)
    network = build_model("simple_cnn", 1, 1, spatial_dims=2, norm="batch", dropout=0)
    model = ImageModel(network, SliceSampler(axis=2)).eval()
    x = torch.randn(1, 1, 16, 16, 4)
    rows = sanity.randomisation_rows(model, x, 0, ["gradient"], Settings.of({}), None, False, np.ones((16, 16, 4), bool),
                                     "sub-1")
    assert [r["from_block"] for r in rows][0] == "head.3" and np.isfinite([r["spearman"] for r in rows]).all()


def test_consistency_between_folds_is_flagged_when_their_maps_disagree():
    rng = np.random.default_rng(0)
    brain = np.ones((6, 6, 6), bool)
    shared = rng.random((6, 6, 6))
    agree = [shared + 0.05 * rng.random((6, 6, 6)) for _ in range(3)]
    disagree = [rng.random((6, 6, 6)) for _ in range(3)]
    steps = pd.DataFrame({"method": ["a", "b"], "blocks_randomised": [5, 5], "of_blocks": [5, 5],
                          "spearman": [0.9, 0.9], "top5_overlap": [0.1, 0.9]})
    table = sanity.summary(steps, {"a": agree, "b": disagree}, brain).set_index("method")
    assert table.at["a", "fold_consistency_r"] > 0.9 and table.at["a", "consistency_verdict"] == "consistent between folds"
    assert table.at["b", "consistency_verdict"].startswith("flagged")
    assert table.at["a", "random_verdict"].startswith("passes") and table.at["b", "random_verdict"].startswith("fails")


def test_study_tables_skip_and_count_undefined_correlations_written_as_n_a(tmp_path):
    """A constant Grad-CAM map after randomisation has no rank correlation: written by the fold job
    as n/a, read back as missing, skipped and counted; a method with none defined is not checked."""
    import nibabel as nib

    from pipeline.common import atomic
    from pipeline.common.paths import group_map

    brain = np.ones((4, 4, 4), bool)
    rng = np.random.default_rng(0)
    constant = np.full((4, 4, 4), 0.5)
    folds = []
    for k in (1, 2):
        fold = tmp_path / f"fold-{k}"
        fold.mkdir()
        rows = [{"image_id": "sub-05_ses-01", "method": "gradcam", "blocks_randomised": 3, "of_blocks": 5,
                 "from_block": "features.2", "spearman": sanity.rank_correlation(rng.random((4, 4, 4)), constant, brain)},
                {"image_id": "sub-05_ses-01", "method": "gradcam", "blocks_randomised": 5, "of_blocks": 5,
                 "from_block": "features.0", "spearman": float("nan")},
                {"image_id": "sub-05_ses-01", "method": "gradient", "blocks_randomised": 5, "of_blocks": 5,
                 "from_block": "features.0", "spearman": 0.2 * k},
                {"image_id": "sub-06_ses-01", "method": "gradient", "blocks_randomised": 5, "of_blocks": 5,
                 "from_block": "features.0", "spearman": float("nan")}]
        rows = [{**r, "spearman_signed": r["spearman"], "top5_overlap": r["spearman"]} for r in rows]
        atomic.to_csv(pd.DataFrame(rows, columns=sanity.COLUMNS), fold / "randomisation.tsv", sep="\t", index=False,
                      float_format="%.4g")
        assert "n/a" in (fold / "randomisation.tsv").read_text()
        for method in ("gradcam", "gradient"):
            nib.save(nib.Nifti1Image(rng.random((4, 4, 4)).astype(np.float32), np.eye(4)), group_map(str(fold), method))
        folds.append(fold)
    steps, summary = sanity.study_tables(folds, ["gradcam", "gradient"], brain)
    full = steps[steps["blocks_randomised"] == 5].set_index("method")
    assert full.at["gradient", "images"] == 2 and full.at["gradient", "undefined"] == 2
    assert full.at["gradient", "spearman"] == pytest.approx(0.3) and full.at["gradient", "top5_overlap"] == pytest.approx(0.3)
    assert full.at["gradcam", "images"] == 0 and full.at["gradcam", "undefined"] == 2
    checks = summary.set_index("method")
    assert checks.at["gradcam", "random_verdict"] == "not checked"
    assert checks.at["gradcam", "random_model_undefined"] == 2 and checks.at["gradient", "random_model_undefined"] == 2
    assert checks.at["gradient", "random_verdict"].startswith("passes")


def test_tables_read_n_a_and_legacy_empty_numeric_cells_as_missing_and_keep_text(tmp_path):
    from pipeline.common import atomic
    from pipeline.common.columns import Undocumented
    from pipeline.common.tables import read_tsv

    path = tmp_path / "t.tsv"
    path.write_text("image_id\tsession\tscore\tnote\told\n"
                    "sub-1\t\tn/a\t\t0.5\n"
                    "sub-2\tses-1\t0.25\tkept\t\n")
    table = read_tsv(path)
    assert table["session"].tolist() == ["", "ses-1"] and table["image_id"].tolist() == ["sub-1", "sub-2"]
    assert np.isnan(table.at[0, "score"]) and table.at[1, "score"] == 0.25
    assert table["note"].tolist() == ["", "kept"]  # text keeps its empty cell
    assert table["old"].dtype.kind == "f" and np.isnan(table.at[1, "old"])
    with pytest.warns(Undocumented, match="score, note, old"):  # not a pipeline table: its dictionary says so
        atomic.to_csv(table, tmp_path / "again.tsv", sep="\t", index=False)
    again = read_tsv(tmp_path / "again.tsv")
    assert np.isnan(again.at[0, "score"]) and again["session"].tolist() == ["", "ses-1"]
