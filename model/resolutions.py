"""The registry of served sizes: it feeds request validation, warm-up and the README table.

The list itself lives in config.yaml (`model_metadata.resolutions`); this module only types it.
With `dynamic=False` every size is its own compiled graph, so a size outside the registry
would compile on the request path for minutes: it is refused instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# The transformer works on 2x2 patches of latents that are 1/8 of the image: sides must divide by 16.
SIDE_MULTIPLE = 16
MIN_SIDE = 256
MAX_SIDE = 2048


@dataclass(frozen=True, order=True)
class Resolution:
    width: int
    height: int

    def __post_init__(self) -> None:
        for name, side in (("width", self.width), ("height", self.height)):
            if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
                raise ValueError(f"{name} {side} must be a multiple of {SIDE_MULTIPLE} in [{MIN_SIDE}, {MAX_SIDE}]")

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


class ResolutionRegistry:
    """An ordered, duplicate-free set of served resolutions."""

    def __init__(self, resolutions: Iterable[Resolution]) -> None:
        self._items = tuple(dict.fromkeys(resolutions))
        if not self._items:
            raise ValueError("at least one resolution must be served")

    @classmethod
    def parse(cls, texts: Iterable[str]) -> ResolutionRegistry:
        return cls(Resolution.parse(text) for text in texts)

    def __iter__(self) -> Iterator[Resolution]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __str__(self) -> str:
        return ", ".join(str(r) for r in self._items)

    def markdown_table(self) -> str:
        """The README's table of served sizes."""
        rows = ["| width | height | megapixels |", "| ---: | ---: | ---: |"]
        rows += [f"| {r.width} | {r.height} | {r.megapixels:.2f} |" for r in self._items]
        return "\n".join(rows)
