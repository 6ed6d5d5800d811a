"""Image sizes: the size type, the bounds a requested size must lie in, and the aspect-ratio registry.

The values live in config.yaml (`model_metadata`: `resolutions`, `min_side`, `max_side`, `max_megapixels`,
`aspect_ratios`); this module only types them and states their rules, for request validation, warm-up and
this README's tables. `resolutions` are the sizes compiled as static graphs and warmed up at load; any other
size inside the bounds is served too, by a graph that is not specialised to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# The transformer works on 2x2 patches of latents that are 1/8 of the image: sides must divide by 16.
SIDE_MULTIPLE = 16
# Whatever the configured bounds, a side beyond this is a typo: 4096x4096 is already 16 megapixels.
ABSOLUTE_MAX_SIDE = 4096
# An aspect ratio names a size of about one megapixel, FLUX.1's native area (1024x1024 is 1.05): within this
# fraction of 1.0 megapixels, which every size of the default registry is (0.98 to 1.05).
MEGAPIXEL_TOLERANCE = 0.1
# A registry entry's sides must match its name's ratio this closely: on the 16-grid 21:9 is 1536x640 (2.4, not
# 2.33), 3% off, while a width and height written the wrong way round is far more.
RATIO_TOLERANCE = 0.05


@dataclass(frozen=True, order=True)
class Resolution:
    width: int
    height: int

    def __post_init__(self) -> None:
        for name, side in (("width", self.width), ("height", self.height)):
            if not 0 < side <= ABSOLUTE_MAX_SIDE or side % SIDE_MULTIPLE:
                raise ValueError(
                    f"{name} {side} must be a multiple of {SIDE_MULTIPLE} from {SIDE_MULTIPLE} to {ABSOLUTE_MAX_SIDE}"
                )

    @classmethod
    def parse(cls, text: str) -> Resolution:
        """Parse "WIDTHxHEIGHT", e.g. "1216x832"."""
        try:
            width, height = (int(part) for part in text.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"resolution {text!r} is not of the form WIDTHxHEIGHT") from exc
        return cls(width, height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    def transposed(self) -> Resolution:
        """The same size the other way round: portrait for landscape."""
        return Resolution(self.height, self.width)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


@dataclass(frozen=True)
class SizeBounds:
    """What sizes a request may ask for: each side a multiple of 16 in [min_side, max_side], and an area cap."""

    min_side: int
    max_side: int
    max_megapixels: float

    def problem(self, width: int, height: int) -> tuple[str, str] | None:
        """The field at fault and the rule it breaks, or None for a size these bounds allow."""
        for name, side in (("width", width), ("height", height)):
            if side % SIDE_MULTIPLE or not self.min_side <= side <= self.max_side:
                return name, f"{side} is not allowed: {self}"
        if width * height / 1e6 > self.max_megapixels:
            return "width/height", f"{width}x{height} is {width * height / 1e6:.2f} megapixels: {self}"
        return None

    def first_outside(self, labelled: Mapping[str, Resolution]) -> str | None:
        """The first of the labelled sizes these bounds refuse, as "LABEL is outside the size bounds: ...", or None."""
        for label, size in labelled.items():
            if problem := self.problem(size.width, size.height):
                return f"{label} is outside the size bounds: {problem[0]} {problem[1]}"
        return None

    def __str__(self) -> str:
        return (
            f"width and height must be multiples of {SIDE_MULTIPLE} from {self.min_side} to {self.max_side}, "
            f"at most {self.max_megapixels:g} megapixels together"
        )


class ResolutionRegistry:
    """An ordered, duplicate-free set of resolutions: those compiled as static graphs."""

    def __init__(self, resolutions: Iterable[Resolution]) -> None:
        self._items = tuple(dict.fromkeys(resolutions))
        if not self._items:
            raise ValueError("at least one resolution must be served")

    @classmethod
    def parse(cls, texts: Iterable[str]) -> ResolutionRegistry:
        return cls(Resolution.parse(text) for text in texts)

    @classmethod
    def coerce(cls, value: Any) -> ResolutionRegistry:
        """From a registry, a list of "WIDTHxHEIGHT" (YAML) or one comma-separated string (an environment variable)."""
        if isinstance(value, ResolutionRegistry):
            return value
        texts = value.split(",") if isinstance(value, str) else value
        return cls.parse(str(text).strip() for text in texts if str(text).strip())

    def __iter__(self) -> Iterator[Resolution]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __str__(self) -> str:
        return ", ".join(str(r) for r in self._items)

    def markdown_table(self) -> str:
        """The README's table of sizes compiled at load."""
        rows = ["| width | height | megapixels |", "| ---: | ---: | ---: |"]
        rows += [f"| {r.width} | {r.height} | {r.megapixels:.2f} |" for r in self._items]
        return "\n".join(rows)


class AspectRatios(Mapping[str, Resolution]):
    """The aspect-ratio registry: a name such as "16:9" for a size of about one megapixel, widest first.

    The order is the sizes' own, not the source's: the config Truss builds is written with yaml.safe_dump, which
    sorts every mapping's keys.
    """

    def __init__(self, sizes: Mapping[str, Resolution]) -> None:
        self._sizes = dict(sorted(sizes.items(), key=lambda item: item[1].height / item[1].width))
        if not self._sizes:
            raise ValueError("at least one aspect ratio must be given")
        for name, size in self._sizes.items():
            _check_entry(name, size)

    @classmethod
    def parse(cls, value: Mapping[Any, Any] | str) -> AspectRatios:
        """From a mapping of name to "WIDTHxHEIGHT" (YAML) or "NAME=WIDTHxHEIGHT,..." (an environment variable)."""
        if isinstance(value, str):
            pairs = [item.partition("=")[::2] for item in value.split(",") if item.strip()]
            if any(not size for _, size in pairs):
                raise ValueError(f"{value!r} is not of the form NAME=WIDTHxHEIGHT,NAME=WIDTHxHEIGHT")
            value = {name.strip(): size.strip() for name, size in pairs}
        for name in value:
            if not isinstance(name, str):
                # YAML 1.1 reads an unquoted 16:9 as the base-60 number 969.
                raise ValueError(f"aspect ratio {name!r} is not a string such as '16:9': quote it in YAML")
        return cls({name: Resolution.parse(str(size)) for name, size in value.items()})

    @classmethod
    def coerce(cls, value: Any) -> AspectRatios:
        """From a registry, or what `parse` takes."""
        if isinstance(value, AspectRatios):
            return value
        if not isinstance(value, Mapping | str):
            raise ValueError("must map each aspect ratio to WIDTHxHEIGHT")
        return cls.parse(value)

    def __getitem__(self, name: str) -> Resolution:
        return self._sizes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def __hash__(self) -> int:  # a setting's default must be hashable
        return hash(tuple(self._sizes.items()))

    def __repr__(self) -> str:
        return f"AspectRatios.parse({str(self)!r})"

    def __str__(self) -> str:
        """The form an environment variable takes."""
        return ",".join(f"{name}={size}" for name, size in self._sizes.items())

    def markdown_table(self) -> str:
        """The README's table of aspect ratios."""
        rows = ["| `aspect_ratio` | width | height | megapixels |", "| --- | ---: | ---: | ---: |"]
        rows += [f"| `{n}` | {r.width} | {r.height} | {r.megapixels:.2f} |" for n, r in self._sizes.items()]
        return "\n".join(rows)


def _check_entry(name: str, size: Resolution) -> None:
    try:
        across, down = (int(part) for part in name.split(":"))
    except ValueError:
        across = down = 0
    if across <= 0 or down <= 0:
        raise ValueError(f"aspect ratio {name!r} is not of the form W:H, e.g. '16:9'")
    if abs(size.width / size.height / (across / down) - 1) > RATIO_TOLERANCE:
        raise ValueError(f"{name}={size} is {size.width / size.height:.2f} wide for 1 high, not {across / down:.2f}")
    if abs(size.megapixels - 1) > MEGAPIXEL_TOLERANCE:
        raise ValueError(
            f"{name}={size} is {size.megapixels:.2f} megapixels; an aspect ratio names a size of about one "
            f"(within {MEGAPIXEL_TOLERANCE:.0%})"
        )


# 1536 is the longest side of the aspect-ratio registry; 2 megapixels bounds one image's memory and time.
DEFAULT_BOUNDS = SizeBounds(min_side=256, max_side=1536, max_megapixels=2.0)
# The sizes FLUX.1 services commonly offer (those of replicate's cog-flux): about one megapixel each, on the 16-grid.
DEFAULT_ASPECT_RATIOS = AspectRatios.parse(
    {
        "21:9": "1536x640",
        "16:9": "1344x768",
        "3:2": "1216x832",
        "4:3": "1152x896",
        "5:4": "1088x896",
        "1:1": "1024x1024",
        "4:5": "896x1088",
        "3:4": "896x1152",
        "2:3": "832x1216",
        "9:16": "768x1344",
        "9:21": "640x1536",
    }
)


@dataclass(frozen=True)
class ServedSizes:
    """What sizes a request may ask for: any size within `bounds`, or an `aspect_ratio` by name."""

    bounds: SizeBounds = DEFAULT_BOUNDS
    aspect_ratios: AspectRatios = DEFAULT_ASPECT_RATIOS
