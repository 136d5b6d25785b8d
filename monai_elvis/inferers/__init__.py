"""Inferers: phrase grounding heatmaps."""

from monai_elvis.inferers.grounding import PhraseGroundingInferer, region_similarity_map

__all__ = ["PhraseGroundingInferer", "region_similarity_map"]
