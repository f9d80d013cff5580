import numpy as np
import pytest
import torch

from pipeline.learning.loader import ArrayLoader, load_batch
from pipeline.common.errors import InputError


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(7):
        paths.append(str(tmp_path / f"img{i}.npy"))
        np.save(paths[-1], rng.normal(size=(2, 4, 5, 3)).astype(np.float32))
        labels.append(str(tmp_path / f"lab{i}.npy"))
        np.save(labels[-1], np.full((1, 4, 5, 3), i, dtype=np.uint8))
    return paths, labels


@pytest.mark.parametrize("recycle", [False, True])
def test_batches_hold_the_arrays_in_order(arrays, recycle):
    paths, labels = arrays
    loader = ArrayLoader(paths, labels, prefetch=2, recycle=recycle)
    lists = [[3, 0, 1], [6], [2, 5], [4]]
    seen = []
    for index, x, y in loader.batches(lists):
        assert x.dtype == torch.float32 and x.shape == (len(index), 2, 4, 5, 3)
        assert torch.equal(x, load_batch([paths[i] for i in index]))  # checked before the next is read
        assert y.dtype == torch.uint8 and [int(v) for v in y[:, 0, 0, 0, 0]] == index
        seen.append(index)
    loader.close()
    assert seen == lists and loader.wait_seconds >= 0


def test_recycled_buffers_are_reused(arrays):
    paths, _ = arrays
    loader = ArrayLoader(paths, prefetch=1, recycle=True)
    pointers = {x.data_ptr() for _, x, _ in loader.batches([[i] for i in range(7)])}
    assert len(pointers) == 2  # prefetch + 1 buffers


def test_missing_or_mismatched_arrays_are_named(arrays, tmp_path):
    paths, _ = arrays
    with pytest.raises(InputError, match="missing.npy"):
        ArrayLoader([*paths, str(tmp_path / "missing.npy")])
    np.save(tmp_path / "odd.npy", np.zeros((2, 4, 5, 4), np.float32))
    loader = ArrayLoader([paths[0], str(tmp_path / "odd.npy")])
    with pytest.raises(InputError, match="odd.npy"):
        list(loader.batches([[0, 1]]))


def test_other_dtypes_and_truncated_files(tmp_path):
    """A float64 or Fortran-ordered array is converted (no plain read); a file cut short is named."""
    data = np.arange(3 * 4 * 5, dtype=np.float64).reshape(1, 3, 4, 5) / 7
    np.save(tmp_path / "f64.npy", data)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(data.astype(np.float32)))
    loader = ArrayLoader([str(tmp_path / "f64.npy"), str(tmp_path / "fortran.npy")])
    (_, images, _), = loader.batches([[0, 1]])
    assert torch.equal(images, torch.from_numpy(np.stack([data, data]).astype(np.float32)))
    loader.close()
    np.save(tmp_path / "short.npy", data.astype(np.float32))
    loader = ArrayLoader([str(tmp_path / "short.npy")])
    with open(tmp_path / "short.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 8)
    with pytest.raises(InputError, match="short.npy is shorter"):
        list(loader.batches([[0]]))
    loader.close()
