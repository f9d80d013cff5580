"""The file index: pybids' entity parsing, its cache, and config filters."""

import json
import os
import pickle
import time

import pytest
from conftest import tree_digest, write_tree

from pipeline.intake import bidsindex
from pipeline.common.errors import InputError

RULES = bidsindex.entity_rules(("bids",))
TRICKY = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-01/ses-02/anat/sub-01_ses-02_acq-mp2rage_run-01_T1w.nii",
    "sub-01/ses-02/anat/sub-01_ses-02_acq-mp2rage_run-01_T1w.json",
    "sub-01/ses-1/func/sub-01_ses-1_task-rest_acq-fullbrain_run-2_echo-3_part-mag_bold.nii.gz",
    "sub-01/ses-1/fmap/sub-01_ses-1_run-1_phasediff.nii.gz",
    "sub-A1/ses-pre/anat/sub-A1_ses-pre_ce-gad_rec-norm_mt-on_inv-2_MP2RAGE.nii.gz",
    "sub-04/ses-01/beh/sub-04_ses-01_task-stroop+blackbg_beh.tsv",
    "sub-01/anat/sub-01_T1w",  # no extension
    "sub-01/anat/odd_name.nii.gz",
    "sub-01/ses-01/anat/sub-01_T1w.nii.gz",  # session only in the folder
]


@pytest.mark.parametrize("relpath", TRICKY)
def test_parse_entities_equals_pybids(relpath):
    from bids.layout.utils import parse_file_entities

    expected = {k: str(v) for k, v in parse_file_entities("/" + relpath, config=["bids"]).items()}
    assert bidsindex.parse_entities(relpath, RULES) == expected


def test_derivative_entities_come_from_pybids_derivatives_config():
    from bids.layout.utils import parse_file_entities

    rules = bidsindex.entity_rules(("bids", "derivatives"))
    rel = "sub-01/anat/sub-01_space-orig_desc-aseg_dseg.nii.gz"
    parsed = bidsindex.parse_entities(rel, rules)
    assert parsed == {k: str(v) for k, v in parse_file_entities("/" + rel).items()}
    assert parsed["desc"] == "aseg" and parsed["space"] == "orig"


SEVEN_T = [f"sub-0{s}/ses-{v}/{p}" for s in (1, 2) for v in (1, 2) for p in (
    f"anat/sub-0{s}_ses-{v}_T1w.nii.gz", f"anat/sub-0{s}_ses-{v}_T1map.nii.gz",
    f"func/sub-0{s}_ses-{v}_task-rest_acq-fullbrain_run-1_bold.nii.gz",
    f"func/sub-0{s}_ses-{v}_task-rest_acq-prefrontal_bold.nii.gz",
    f"func/sub-0{s}_ses-{v}_task-rest_acq-fullbrain_run-1_physio.tsv.gz",
    f"fmap/sub-0{s}_ses-{v}_run-2_magnitude1.nii.gz")]


def test_index_matches_bids_layout_on_a_zero_byte_tree(tmp_path):
    from bids import BIDSLayout

    root = write_tree(tmp_path / "7t", SEVEN_T + ["derivatives/x/sub-01/anat/sub-01_T1w.nii.gz", "code/sub-09_T1w.nii"])
    index = bidsindex.load_index(root)
    layout = BIDSLayout(root, validate=False)
    expected = {f.relpath: {k: str(v) for k, v in f.get_entities().items()}
                for f in layout.get(extension=[".nii", ".nii.gz"])}
    ours = {row["path"]: {k: v for k, v in row.items() if k != "path" and v != ""}
            for row in index.to_dict("records")}
    assert ours == expected
    assert len(ours) == 20  # NIfTIs only; derivatives and code left out, as pybids does


def test_cache_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "ds", SEVEN_T)
    before = tree_digest(root)
    first = bidsindex.load_index(root, tmp_path / "cache")
    assert tree_digest(root) == before  # the cache lives outside the dataset
    calls = []
    monkeypatch.setattr(bidsindex, "index_listing", lambda *a: calls.append(a) or first)
    bidsindex.load_index(root, tmp_path / "cache")
    assert calls == []  # unchanged tree: nothing parsed
    (root / "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz").touch()
    bidsindex.load_index(root, tmp_path / "cache")
    assert len(calls) == 1
    image = root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    image.write_bytes(b"rewritten in place")
    bidsindex.load_index(root, tmp_path / "cache")
    assert len(calls) == 1  # same names, same entities (header checks cache per file stamp)


def test_warm_cache_is_checked_with_stat_calls_only(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "ds", SEVEN_T)
    an_hour_ago = time.time_ns() - 3600 * 10**9  # older than RACY_NS: folder mtimes are trusted
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, ns=(an_hour_ago, an_hour_ago))
    first = bidsindex.load_index(root, tmp_path / "cache")
    scans = []
    real_scan = bidsindex.scan_tree
    monkeypatch.setattr(bidsindex, "scan_tree", lambda *a, **k: scans.append(a) or real_scan(*a, **k))
    assert bidsindex.load_index(root, tmp_path / "cache").equals(first) and scans == []
    (root / "sub-02/ses-2/anat/sub-02_ses-2_FLAIR.nii.gz").touch()  # a new entry changes its folder's mtime:
    os.utime(root / "sub-02/ses-2/anat", ns=(an_hour_ago + 1, an_hour_ago + 1))  # set, so the next scan trusts it
    assert len(bidsindex.load_index(root, tmp_path / "cache")) == len(first) + 1 and len(scans) == 1
    (root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").write_bytes(b"rewritten in place")
    bidsindex.load_index(root, tmp_path / "cache")
    assert len(scans) == 1  # names are unchanged (the header checks have their own per-file cache)
    (root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").rename(root / "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz")
    assert "T2w" in set(bidsindex.load_index(root, tmp_path / "cache")["suffix"]) and len(scans) == 2


@pytest.mark.parametrize("content", [b"not JSON", b'{"key": [2, "tr', b"[]", b"\xff\xfe\x00",
                                     b'{"key": "other", "files": {"path": []}}'])
def test_corrupt_cache_is_rebuilt(tmp_path, content):
    root = write_tree(tmp_path / "ds", SEVEN_T)
    expected = bidsindex.load_index(root, tmp_path / "cache")
    caches = list((tmp_path / "cache").glob("index-*.json"))
    assert len(caches) == 1
    caches[0].write_bytes(content)
    assert bidsindex.load_index(root, tmp_path / "cache").equals(expected)
    assert bidsindex.load_index(root, tmp_path / "cache").equals(expected)  # and the rebuilt cache is read back


def test_a_cache_of_the_right_key_but_the_wrong_shape_is_rebuilt(tmp_path):
    root = write_tree(tmp_path / "ds", SEVEN_T)
    expected = bidsindex.load_index(root, tmp_path / "cache")
    cache = next((tmp_path / "cache").glob("index-*.json"))
    good = json.loads(cache.read_text())
    for damage in ({"folders": ["sub-01/"]}, {"scanned_at": "yesterday"}, {"files": {"path": ["a"], "suffix": []}},
                   {"fingerprint": None}):
        cache.write_text(json.dumps({**good, **damage}))
        assert bidsindex.load_index(root, tmp_path / "cache").equals(expected), damage


def pickle_payload(marker):
    """Bytes that create ``marker`` when unpickled."""

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    return pickle.dumps(Payload())


def test_a_pickle_in_the_cache_folder_is_never_unpickled(tmp_path):
    pickle.loads(pickle_payload(tmp_path / "proof"))
    assert (tmp_path / "proof").exists()  # the payload works when unpickled
    root = write_tree(tmp_path / "ds", SEVEN_T)
    expected = bidsindex.load_index(root, tmp_path / "cache")
    marker = tmp_path / "unpickled"
    for cache in (tmp_path / "cache").glob("index-*.json"):
        cache.write_bytes(pickle_payload(marker))
        cache.with_suffix(".pkl").write_bytes(pickle_payload(marker))  # where version 1 kept it
    assert bidsindex.load_index(root, tmp_path / "cache").equals(expected)
    assert not marker.exists()


@pytest.fixture
def index(tmp_path):
    return bidsindex.load_index(write_tree(tmp_path / "ds", SEVEN_T))


def selected(index, filters):
    conds = bidsindex.conditions(filters, RULES, "bids_filters")
    return sorted(p.rsplit("/", 1)[1] for p in bidsindex.select(index, conds)["path"])


def test_filter_values_exact_list_absent_and_regex(index):
    assert selected(index, {"subject": "01", "session": "1", "suffix": ["T1w", "T1map"]}) == [
        "sub-01_ses-1_T1map.nii.gz", "sub-01_ses-1_T1w.nii.gz"]
    bold = {"subject": "01", "session": "1", "suffix": "bold"}
    assert selected(index, {**bold, "run": None}) == ["sub-01_ses-1_task-rest_acq-prefrontal_bold.nii.gz"]
    assert selected(index, {**bold, "acquisition": {"regex": "full"}}) == []  # a full match, not a search
    assert selected(index, {**bold, "acquisition": {"regex": "full.*"}}) == [
        "sub-01_ses-1_task-rest_acq-fullbrain_run-1_bold.nii.gz"]
    assert len(selected(index, {**bold, "run": [None, "1"]})) == 2


def test_run_compares_as_integer_and_extension_gets_its_dot(index):
    assert selected(index, {"subject": "01", "session": "1", "run": 2}) == ["sub-01_ses-1_run-2_magnitude1.nii.gz"]
    assert selected(index, {"subject": "01", "session": "1", "run": "02"}) == ["sub-01_ses-1_run-2_magnitude1.nii.gz"]
    assert len(selected(index, {"extension": "nii.gz", "suffix": "T1w"})) == 4


def test_unknown_entity_names_key_and_lists_valid_ones():
    with pytest.raises(InputError, match=r"Unknown BIDS entity 'acq' in channels\.T1w \('acq' is the file-name key "
                                         r"of 'acquisition'\)\. Valid entities: subject, session,"):
        bidsindex.conditions({"acq": "mprage"}, RULES, "channels.T1w")


def test_bad_filter_values_are_named():
    with pytest.raises(InputError, match=r"bids_filters\.session: 1 is a number .* quote it"):
        bidsindex.conditions({"session": 1}, RULES, "bids_filters")
    with pytest.raises(InputError, match=r"bids_filters\.acquisition: invalid regex"):
        bidsindex.conditions({"acquisition": {"regex": "("}}, RULES, "bids_filters")
    with pytest.raises(InputError, match=r"bids_filters\.run: run is an integer entity"):
        bidsindex.conditions({"run": "one"}, RULES, "bids_filters")


def test_empty_selection_names_the_filter_and_the_values_that_exist(index):
    conds = bidsindex.conditions({"datatype": "anat", "suffix": "FLAIR"}, RULES, "bids_filters")
    message = bidsindex.explain_empty(index, conds, "bids_filters + channels.FLAIR")
    assert message.startswith("bids_filters + channels.FLAIR selects no file: none has suffix 'FLAIR'")
    assert "8 NIfTI files pass the filters before it" in message
    assert "'T1map' (4 files), 'T1w' (4 files)" in message
