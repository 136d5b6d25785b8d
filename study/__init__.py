"""The reproduction study: pre-training objectives compared on the phantom (``python -m study``).

Runs the bundles of this repository (pre-training, grounding, segmentation) for every objective and seed and
writes tables and plots to ``docs/results``. Kept outside the ``monai_elvis`` library, which never imports
bundles.
"""
