"""The --group-components fix (pipeline.common.snakemake_compat): installed because the installed
Snakemake shows the bug, and right where Snakemake's own method is wrong. The cluster dry run
(tests/cluster/test_dry_run.py) checks the batches of a real plan of 2,000 images."""

from __future__ import annotations

import math

import pytest
import snakemake

from pipeline.common import snakemake_compat as compat


def test_the_installed_snakemake_has_the_bug():
    """Snakemake's own method merges each batch into its first group, which its cache hands back on
    the next DAG update as one image: 8 images by 2 give batches of 4 after two updates (which ones,
    and how many, follow set order), instead of four of 2. When this fails, a new Snakemake fixed
    it: the fix is no longer installed, and it can go."""
    assert compat.has_the_bug(), f"snakemake {snakemake.__version__} batches --group-components right"
    assert compat.batch_sizes(compat.snakemakes_method(), images=8, n=2, updates=1) == [2, 2, 2, 2]
    for updates in (2, 3):
        assert compat.batch_sizes(compat.snakemakes_method(), images=8, n=2, updates=updates)[0] >= 4


@pytest.mark.parametrize("images, n, updates", [(8, 2, 1), (8, 2, 3), (7, 3, 4), (2000, 50, 3), (5, 10, 2)])
def test_the_fix_gives_ceil_images_over_n_batches_on_every_update(images, n, updates):
    sizes = compat.batch_sizes(compat._update_group_components, images, n, updates)
    assert sizes == compat.expected(images, n) and len(sizes) == math.ceil(images / n) and sum(sizes) == images


def test_the_fix_is_installed_only_with_the_bug(monkeypatch):
    DAG = compat._dag_class()
    own = compat.snakemakes_method()
    monkeypatch.setattr(DAG, "_update_group_components", own)
    monkeypatch.setattr(DAG, compat.ORIGINAL, own, raising=False)  # recorded, so the test leaves none behind
    monkeypatch.delattr(DAG, compat.ORIGINAL)
    monkeypatch.setattr(compat, "has_the_bug", lambda: False)
    assert not compat.fix_group_components() and DAG._update_group_components is own
    monkeypatch.setattr(compat, "has_the_bug", lambda: True)
    assert compat.fix_group_components() and DAG._update_group_components is compat._update_group_components
    assert compat.snakemakes_method() is own  # kept: the bug is still tested on Snakemake's own method
    assert compat.fix_group_components()  # a second workflow in the same process
    assert compat.snakemakes_method() is own
