"""The patients' lesion: named spheres in template space, the lesion sites and the ``--lesion-*`` options."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.common.errors import InputError


@dataclass(frozen=True)
class Sphere:
    """A named spherical region in template world coordinates (mm, RAS+) with a smooth edge."""

    name: str
    centre_mm: tuple[float, float, float]
    radius_mm: float
    edge_mm: float


LESION_SITES = {  # where patients' lesions sit (nominal centre and radius; --lesion-site)
    "temporal-wm": Sphere("right temporal white matter", (38.0, -25.0, 0.0), 10.0, 1.5),
    "deep-gm": Sphere("right putamen (deep grey matter)", (25.0, 2.0, 0.0), 5.0, 1.0),
    "thalamus": Sphere("right thalamus", (12.0, -18.0, 8.0), 5.0, 1.0),
    "hippocampus": Sphere("left hippocampus", (-28.0, -22.0, -14.0), 5.0, 1.0),
}


@dataclass(frozen=True)
class Lesion:
    """The patients' lesion: its ``site`` (nominal centre, radius and edge), each patient's radius
    as the nominal one times uniform(``radius_scale``), the intensity ``multiplier`` at its core
    (uniform in the range: 0.6 is 40 % darker) and the centre's ``jitter_mm`` (uniform ±mm per axis)."""

    site: Sphere = LESION_SITES["temporal-wm"]
    radius_scale: tuple[float, float] = (0.8, 1.2)
    multiplier: tuple[float, float] = (0.35, 0.55)
    jitter_mm: float = 0.0

    @classmethod
    def from_options(cls, site: str = "temporal-wm", radius_mm: float | None = None,
                     contrast: tuple[float, float] | None = None, jitter_mm: float = 0.0) -> "Lesion":
        """The lesion of the command-line options; ``contrast`` is the range of the fraction of
        intensity lost at the core (e.g. (0.25, 0.40)); None keeps the default lesion's."""
        if site not in LESION_SITES:
            raise InputError(f"--lesion-site must be one of {sorted(LESION_SITES)}, not {site!r}.")
        sphere = LESION_SITES[site]
        if radius_mm is not None:
            if not 1 <= radius_mm <= 30:
                raise InputError(f"--lesion-radius must be between 1 and 30 mm, got {radius_mm}.")
            sphere = Sphere(sphere.name, sphere.centre_mm, float(radius_mm), sphere.edge_mm)
        multiplier = cls.multiplier
        if contrast is not None:
            low, high = contrast
            if not 0 < low <= high < 1:
                raise InputError(f"--lesion-contrast needs 0 < LOW <= HIGH < 1, got {low} {high}.")
            multiplier = (round(1.0 - high, 6), round(1.0 - low, 6))
        if not 0 <= jitter_mm <= 20:
            raise InputError(f"--lesion-jitter must be between 0 and 20 mm, got {jitter_mm}.")
        return cls(sphere, cls.radius_scale, multiplier, float(jitter_mm))

    def draw(self, rng: np.random.Generator) -> dict:
        """One patient's lesion: radius_mm, multiplier and centre_mm (jittered when jitter_mm > 0)."""
        radius = self.site.radius_mm * rng.uniform(*self.radius_scale)
        multiplier = rng.uniform(*self.multiplier)
        centre = np.asarray(self.site.centre_mm)
        if self.jitter_mm:  # drawn only then: the default cohort's random stream is unchanged
            centre = centre + rng.uniform(-self.jitter_mm, self.jitter_mm, 3)
        return {"radius_mm": float(round(radius, 2)), "multiplier": float(round(multiplier, 3)),
                "centre_mm": [round(float(v), 3) for v in centre]}

    def largest(self) -> dict:
        """The largest and strongest lesion at the nominal centre, its radius grown by the jitter's
        reach: its effect covers every patient's lesion (the ground-truth mask)."""
        reach = self.jitter_mm * np.sqrt(3)
        return {"radius_mm": self.site.radius_mm * self.radius_scale[1] + reach, "multiplier": self.multiplier[0],
                "centre_mm": list(self.site.centre_mm)}
