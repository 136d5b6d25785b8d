"""Inferers: phrase grounding heatmaps."""

from monai_elvis.inferers.grounding import (
    PhraseGroundingInferer,
    RegionPlacement,
    region_similarity_map,
    upsample_region_map,
)

__all__ = ["PhraseGroundingInferer", "RegionPlacement", "region_similarity_map", "upsample_region_map"]
