"""What the network sees of a batch of images (config `train.sampler`): whole images, 2D slices
along an axis, or 3D patches — nitrain's SliceSampler/BlockSampler idea.

A batch of ``B`` images (B, C, X, Y, Z) with targets ``y`` — (B,) scalars, or (B, 1, X, Y, Z)
label images — becomes ``B × per_image`` views (random slices or patch positions, drawn from a
seeded generator) served in shuffled sub-batches of ``batch_size`` views: one optimisation
step each. A scalar target is repeated for every view of its image; a label image is cut the
same way as its image.

Prediction uses fixed views: every slice along the axis, or patches on a grid with half-patch
stride covering the image. ``aggregate`` maps the views' outputs back to one prediction per
image: the **mean of the network outputs** (regression values, or classification logits) over
that image's views. ``ImageModel`` wraps a network so that evaluation and explanation always
call it on whole (B, C, X, Y, Z) images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from pipeline.common import config as study_config


def aggregate(outputs: torch.Tensor, index: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean of the (V, ...) view ``outputs`` per image: ``index`` (V,) names each view's image;
    returns (n_images, ...)."""
    total = torch.zeros(n_images, *outputs.shape[1:], dtype=outputs.dtype, device=outputs.device)
    total = total.index_add(0, index.to(outputs.device), outputs)
    counts = torch.bincount(index, minlength=n_images).to(outputs).view(-1, *(1,) * (outputs.ndim - 1))
    return total / counts


@dataclass(frozen=True)
class Sampler:
    """Whole images (``kind: image``): each view is an image, ``per_image`` is 1."""

    batch_size: int | None = None  # views per sub-batch; None: as many as images in the batch
    per_image: int = 1
    kind = "image"
    spatial_dims = 3

    def positions(self, shape, n_images: int, generator: torch.Generator) -> list[tuple[int, ...]]:
        """Random view positions, ``per_image`` per image, in image order: (image, *position)."""
        return [(i,) for i in range(n_images)]

    def grid(self, shape) -> list[tuple[int, ...]]:
        """The fixed view positions of one image used for prediction."""
        return [()]

    def cut(self, x: torch.Tensor, views: list[tuple[int, ...]]) -> torch.Tensor:
        """(V, C, ...) views of ``x`` (B, C, X, Y, Z) at (image, *position) ``views``."""
        return x[[v[0] for v in views]]

    def sub_batch(self, n_images: int) -> int:
        return self.batch_size or n_images

    def sub_batches(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (views, targets) sub-batches of ``batch_size`` from a batch of images; a last
        sub-batch of one view is dropped (BatchNorm cannot train on one)."""
        views = self.positions(x.shape[2:], x.shape[0], generator)
        order = torch.randperm(len(views), generator=generator).tolist()
        size = self.sub_batch(x.shape[0])
        for start in range(0, len(order), size):
            chosen = [views[i] for i in order[start:start + size]]
            if len(chosen) == 1 and size > 1:
                break
            yield self.cut(x, chosen), self.targets(y, chosen)

    def targets(self, y: torch.Tensor, views: list[tuple[int, ...]]) -> torch.Tensor:
        """Targets of ``views``: scalars repeated, label images (B, 1, X, Y, Z) cut like the image."""
        if y.ndim <= 1:
            return y[[v[0] for v in views]]
        return self.cut(y, views)

    def count(self, n_images: int, batch_images: int) -> int:
        """Sub-batches (optimisation steps) per epoch over ``n_images`` in batches of ``batch_images``."""
        steps = 0
        for start in range(0, n_images, batch_images):
            images = min(batch_images, n_images - start)
            views, size = images * self.per_image, self.sub_batch(images)
            steps += views // size + (views % size > 1)  # a last sub-batch of one view is dropped
        return steps

    def prediction_views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed views of every image for prediction: (V, C, ...) views and (V,) image index."""
        grid = self.grid(x.shape[2:])
        views = [(i, *p) for i in range(x.shape[0]) for p in grid]
        return self.cut(x, views), torch.tensor([v[0] for v in views])

    def place(self, maps: torch.Tensor, shape) -> torch.Tensor:
        """One image's (V, *view) maps of its prediction views (``grid(shape)``'s order) as one map
        on the (X, Y, Z) image grid: the inverse of ``cut``."""
        return maps[0]


@dataclass(frozen=True)
class SliceSampler(Sampler):
    """2D slices along spatial ``axis`` (0-2 of X, Y, Z): ``per_image`` random slices of each
    image per batch (distinct while the axis has enough); prediction uses every slice."""

    axis: int = 2
    kind = "slices"
    spatial_dims = 2

    def positions(self, shape, n_images, generator):
        size = shape[self.axis]
        views = []
        for i in range(n_images):
            if self.per_image <= size:
                chosen = torch.randperm(size, generator=generator)[:self.per_image]
            else:  # more slices than the axis has: with repeats
                chosen = torch.randint(0, size, (self.per_image,), generator=generator)
            views += [(i, int(s)) for s in chosen]
        return views

    def grid(self, shape):
        return [(s,) for s in range(shape[self.axis])]

    def cut(self, x, views):
        moved = x.movedim(2 + self.axis, 1)  # (B, S, C, ...)
        return moved[[v[0] for v in views], [v[1] for v in views]]

    def place(self, maps, shape):
        return maps.movedim(0, self.axis)  # (S, ...) slices stacked back along the axis


@dataclass(frozen=True)
class PatchSampler(Sampler):
    """3D patches of ``size`` voxels: ``per_image`` at uniformly random positions per image;
    prediction uses a grid of patches with stride size/2 (the last one flush with the far edge)."""

    size: tuple[int, int, int] = (32, 32, 32)
    kind = "patches"

    def check(self, shape):
        if any(p > s for p, s in zip(self.size, shape)):
            raise ValueError(f"Patch size {list(self.size)} is larger than the image grid {list(shape)}; "
                             "lower `train.sampler.size`.")

    def positions(self, shape, n_images, generator):
        self.check(shape)
        high = torch.tensor([s - p + 1 for s, p in zip(shape, self.size)])
        corners = (torch.rand(n_images, self.per_image, 3, generator=generator) * high).long()
        return [(i, *map(int, corners[i, k])) for i in range(n_images) for k in range(self.per_image)]

    def grid(self, shape):
        self.check(shape)
        starts = []
        for s, p in zip(shape, self.size):
            stride = max(1, p // 2)
            axis = list(range(0, s - p + 1, stride))
            starts.append(axis + ([s - p] if axis[-1] != s - p else []))
        return [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]

    def cut(self, x, views):
        px, py, pz = self.size
        return torch.stack([x[i, :, a:a + px, b:b + py, c:c + pz] for i, a, b, c in views])

    def place(self, maps, shape):
        """Overlapping patches averaged (as sliding-window inference averages them)."""
        total = maps.new_zeros(tuple(shape))
        counts = maps.new_zeros(tuple(shape))
        px, py, pz = self.size
        for patch, (a, b, c) in zip(maps, self.grid(shape)):
            total[a:a + px, b:b + py, c:c + pz] += patch
            counts[a:a + px, b:b + py, c:c + pz] += 1
        return total / counts


def build_sampler(config: dict | None) -> Sampler:
    """The sampler of config `train.sampler` (``{kind: image}`` when empty), what it leaves out
    filled from the schema's defaults. Keys of the other kinds are ignored; a key of no kind is an
    error."""
    given = dict(config or {})
    kinds = {"image": Sampler, "slices": SliceSampler, "patches": PatchSampler}
    known = {"kind"} | {f.name for cls in kinds.values() for f in dataclasses.fields(cls)}
    if set(given) - known:
        raise ValueError(f"Unknown sampler setting(s) {sorted(set(given) - known)}; known: {sorted(known)}")
    config = study_config.resolved(["train", "sampler"], given)
    kind = config.pop("kind")
    if kind not in kinds:
        raise ValueError(f"Unknown sampler kind {kind!r}; choose one of {sorted(kinds)}")
    own = {f.name for f in dataclasses.fields(kinds[kind])}
    config = {k: v for k, v in config.items() if k in own and not (kind == "image" and k == "per_image")}
    if kind == "slices" and config["axis"] not in (0, 1, 2):
        raise ValueError(f"Slice axis must be 0, 1 or 2, not {config['axis']}")
    if kind == "patches":
        config["size"] = tuple(config["size"])
        if len(config["size"]) != 3:
            raise ValueError(f"Patch size must have 3 entries, not {list(config['size'])}")
    return kinds[kind](**config)


class ImageModel(nn.Module):
    """A network trained on views, applied to whole (B, C, X, Y, Z) images: the mean of its
    outputs over the sampler's prediction views of each image (``aggregate``)."""

    def __init__(self, network: nn.Module, sampler: Sampler, chunk: int = 256):
        super().__init__()
        self.network, self.sampler, self.chunk = network, sampler, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sampler.kind == "image":
            return self.network(x)
        views, index = self.sampler.prediction_views(x)
        outputs = torch.cat([self.network(views[i:i + self.chunk]) for i in range(0, len(views), self.chunk)])
        return aggregate(outputs, index, x.shape[0])


def views_of(model: nn.Module) -> tuple[nn.Module, Sampler, int]:
    """The network inside ``model``, the sampler whose views it sees and the views per call: an
    ``ImageModel``'s, or a plain network's whole images."""
    if isinstance(model, ImageModel):
        return model.network, model.sampler, model.chunk
    return model, Sampler(), 1


SLIDING_OVERLAP = 0.5  # patches: MONAI sliding-window inference, half-patch overlap


class SegmentationModel(nn.Module):
    """A segmentation network trained on views, applied to whole (B, C, X, Y, Z) images: (B, K,
    X, Y, Z) logits. Whole images: the network itself; slices: every slice along the axis, stacked
    back; patches: MONAI's sliding-window inference with the patch size and half-patch overlap
    (overlapping logits averaged). ``inference()`` says which, for a package's ``spec.json``."""

    def __init__(self, network: nn.Module, sampler: Sampler, chunk: int = 64):
        super().__init__()
        self.network, self.sampler, self.chunk = network, sampler, chunk

    def inference(self) -> dict:
        """How whole (K, X, Y, Z) logit maps are assembled from the network's views (plain types)."""
        kind = self.sampler.kind
        if kind == "image":
            return {"views": "image", "rule": "the network on the whole (B, C, X, Y, Z) image"}
        if kind == "slices":
            axis = self.sampler.axis
            return {"views": "slices", "axis": axis, "views_per_call": self.chunk,
                    "rule": f"every slice along axis {axis} (0-2 of X, Y, Z) in order, {self.chunk} per call of the "
                            "2D network, (B, C, *slice); the slices' (K, *slice) logits stacked back along the axis"}
        return {"views": "patches", "size": list(self.sampler.size), "overlap": SLIDING_OVERLAP,
                "views_per_call": self.chunk,
                "rule": f"MONAI sliding_window_inference (roi_size {list(self.sampler.size)}, overlap "
                        f"{SLIDING_OVERLAP}, sw_batch_size {self.chunk}, mode constant): overlapping patch logits averaged"}

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The views of ``x`` (B, C, X, Y, Z) its network sees: the images, every slice (image-major,
        in order) or the patch grid (half-patch stride, as ``PatchSampler.grid``)."""
        if self.sampler.kind == "image":
            return x
        return self.sampler.prediction_views(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sampler.kind == "image":
            return self.network(x)
        if self.sampler.kind == "patches":
            from monai.inferers import sliding_window_inference

            self.sampler.check(x.shape[2:])
            return sliding_window_inference(x, list(self.sampler.size), self.chunk, self.network,
                                            overlap=SLIDING_OVERLAP)
        views = self.views(x)  # (B * S, C, ...): image-major, slices in order
        outputs = torch.cat([self.network(views[i:i + self.chunk]) for i in range(0, len(views), self.chunk)])
        stacked = outputs.reshape(x.shape[0], -1, *outputs.shape[1:])  # (B, S, K, ...)
        return stacked.movedim(1, 2 + self.sampler.axis)
