"""Atomic outputs: a crash mid-write leaves neither a file at the final path nor temporary litter,
and every stage writes through pipeline.common.atomic."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.common import atomic

PACKAGE = Path(atomic.__file__).parents[1]


class Crash(Exception):
    pass


def test_crash_mid_write_leaves_nothing(tmp_path):
    final = tmp_path / "metrics.json"
    with pytest.raises(Crash):
        with atomic.open_(final) as f:
            f.write('{"half": ')
            raise Crash
    assert list(tmp_path.iterdir()) == []


def test_crash_keeps_the_previous_file(tmp_path):
    final = tmp_path / "predictions.tsv"
    atomic.write_text(final, "old\n")
    with pytest.raises(Crash):
        with atomic.path(final) as tmp:
            tmp.write_text("new, half")
            raise Crash
    assert final.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.tsv"]


def test_writer_that_writes_nothing_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing was written"):
        with atomic.path(tmp_path / "x.npy"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_temporary_name_keeps_the_suffix(tmp_path):
    for name, suffix in [("a.nii.gz", ".nii.gz"), ("qc.png", ".png"), ("x.npy", ".npy"), ("p.tar.gz", ".tar.gz"),
                         ("README", "")]:
        tmp = atomic.temporary_name(tmp_path / name)
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp" + suffix)


def test_library_writers_round_trip(tmp_path):
    img = nib.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4))
    atomic.nib_save(img, tmp_path / "map.nii.gz")
    atomic.np_save(tmp_path / "array.npy", np.ones((1, 2, 2, 2), np.float32))
    atomic.to_csv(pd.DataFrame({"epoch": [1]}), tmp_path / "t.tsv", sep="\t", index=False)
    assert nib.load(tmp_path / "map.nii.gz").get_fdata().sum() == 28  # gzipped: nibabel read the suffix
    assert np.load(tmp_path / "array.npy").shape == (1, 2, 2, 2)
    assert (tmp_path / "t.tsv").read_text() == "epoch\n1\n"
    # A TSV comes with its data dictionary (pipeline.common.columns; tests/test_columns.py)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["array.npy", "map.nii.gz", "t.json", "t.tsv"]


# Calls that create an output file directly; each stage must use pipeline.common.atomic instead.
DIRECT = re.compile(r"\bnib\.save\(|\bnp\.save\(|\.to_csv\([^)]|\.write_text\(|\.write_bytes\(|\btorch\.save\(|"
                    r"\bsave_file\(|\.savefig\(|shutil\.copy|\bjson\.dump\(|\bpickle\.dump\(|ants\.write_transform\("
                    r"|ants\.image_write\(|torch\.onnx\.export\(|open\([^)]*[\"'][wax]b?[\"']")


def test_no_stage_writes_around_atomic():
    """Every direct write in the package sits inside an ``atomic`` block (the temporary path or
    file it yields): the line, or one of the two before it, names ``atomic.`` — or it is atomic.py."""
    offenders = []
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name == "atomic.py":
            continue
        lines = module.read_text().splitlines()
        for number, line in enumerate(lines):
            code = line.split("#")[0]
            if DIRECT.search(code) and not code.lstrip().startswith(("\"", "'")):
                context = "\n".join(lines[max(0, number - 2):number + 1])
                # exempt: a tar written into memory; an exclusive create (the registry's claim is
                # atomic by itself: exactly one process creates the file)
                if "atomic." not in context and "fileobj=buffer" not in code and '"xb"' not in code:
                    offenders.append(f"{module.name}:{number + 1}: {line.strip()}")
    assert offenders == [], "write these through pipeline.common.atomic:\n" + "\n".join(offenders)


def test_files_get_the_mode_of_a_plain_open_even_from_writers_that_restrict_it(tmp_path):
    """safetensors creates 0600 files; through atomic they get 0666 less the umask, like open()."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    with atomic.path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    atomic.write_text(tmp_path / "t.txt", "x")
    old = os.umask(0o022)
    os.umask(old)
    for name in ("w.safetensors", "t.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~old
