"""monai-elvis: ELVIS vision-language pre-training for chest X-rays as MONAI components.

Sub-packages:

- :mod:`monai_elvis.networks`: image and text encoders, projection heads, cross-modal attention, :class:`ElvisNet`.
- :mod:`monai_elvis.losses`: global contrastive, local alignment (one_hot | spatial | intra_modal), GLoRIA-style
  local loss and the combined :class:`ElvisLoss`.
- :mod:`monai_elvis.keys`: the one dictionary-key vocabulary used end to end.
"""

__version__ = "0.1.0"
