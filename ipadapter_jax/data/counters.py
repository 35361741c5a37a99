"""Counts of what the input pipeline used, skipped (by reason) and converted (by kind).

Kept as plain dicts of ints so they travel inside the resumable, JSON-serialisable source state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Skip reasons the sources use (other strings are allowed; these are the documented ones).
SKIP_REASONS = (
    "undecodable_image",  # PIL could not read the image bytes (corrupt, truncated, wrong format)
    "image_too_large",  # decompression-bomb guard (max_pixels)
    "image_too_small",  # shorter side below min_side
    "unsupported_image_mode",  # e.g. floating-point images
    "extreme_aspect_ratio",  # long side / short side above max_aspect_ratio
    "missing_image",  # sample has no jpg/jpeg/png/webp member
    "missing_caption",  # no txt member / json has no caption field / caption empty
    "bad_caption",  # caption bytes not UTF-8, json not parseable or field not a string
    "shard_open_failed",  # shard URL could not be opened (missing file, unreachable URL)
    "shard_read_error",  # shard stopped with an error part-way (truncated or corrupt tar)
    "bad_cache_sample",  # latent-cache sample with a missing, unreadable or wrongly shaped member
)


@dataclass
class SampleCounters:
    """skipped: reason -> count; converted: conversion (e.g. "CMYK->RGB") -> count;
    used: samples that went into batches; shards_finished: shards read to the end (or failed)."""

    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    used: int = 0
    shards_finished: int = 0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def convert(self, kind: str) -> None:
        if kind:
            self.converted[kind] = self.converted.get(kind, 0) + 1

    def add(self, other: "SampleCounters") -> None:
        """Count ``other``'s samples and shards in too (several shards or writers into one total)."""
        for reason, n in other.skipped.items():
            self.skip(reason, n)
        for kind, n in other.converted.items():
            self.converted[kind] = self.converted.get(kind, 0) + n
        self.used += other.used
        self.shards_finished += other.shards_finished

    def to_dict(self) -> dict:
        return {
            "skipped": dict(sorted(self.skipped.items())),
            "converted": dict(sorted(self.converted.items())),
            "used": self.used,
            "shards_finished": self.shards_finished,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "SampleCounters":
        return cls(
            skipped={str(k): int(v) for k, v in data.get("skipped", {}).items()},
            converted={str(k): int(v) for k, v in data.get("converted", {}).items()},
            used=int(data.get("used", 0)),
            shards_finished=int(data.get("shards_finished", 0)),
        )

    def copy(self) -> "SampleCounters":
        return SampleCounters.from_dict(self.to_dict())
