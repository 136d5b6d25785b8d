"""monai-elvis: ELVIS vision-language pre-training for chest X-rays as MONAI components.

Sub-packages:

- :mod:`monai_elvis.networks`: image and text encoders, projection heads, cross-modal attention, :class:`ElvisNet`.
- :mod:`monai_elvis.losses`: global contrastive, local alignment (one_hot | spatial | intra_modal), GLoRIA-style
  local loss and the combined :class:`ElvisLoss`.
- :mod:`monai_elvis.transforms`: CXR loading (DICOM/PNG/JPEG), report sections, sentences, tokenisation, labels.
- :mod:`monai_elvis.data`: datalist builders, the text collate, the phantom dataset (:mod:`monai_elvis.data.phantom`).
- :mod:`monai_elvis.metrics`: retrieval recall@K, locality preservation, grounding CNR / pointing game / IoU.
- :mod:`monai_elvis.engines`: pieces that run pre-training on MONAI's ignite engines.
- :mod:`monai_elvis.inferers`: phrase-grounding heatmaps.
- :mod:`monai_elvis.keys`: the one dictionary-key vocabulary used end to end.
- :mod:`monai_elvis.bundle`: checks the bundles' configs run first (inputs, models, command-line settings).
- :mod:`monai_elvis.errors`: errors that say what to do (:class:`~monai_elvis.errors.UsageError`).

Under ``python -m monai.bundle`` a :class:`~monai_elvis.errors.UsageError` is printed as its message, without the
traceback (``MONAI_ELVIS_TRACEBACK=1`` shows it), and MONAI's empty input-summary block and ignite's "resuming from
iteration 0" of a fresh run are left out of the log (:mod:`monai_elvis.runner_logs`); nothing changes in any other
process.
"""

from monai_elvis import bundle, errors
from monai_elvis.errors import install_bundle_excepthook as _install_bundle_excepthook
from monai_elvis.runner_logs import install_runner_log_filters as _install_runner_log_filters

__version__ = "0.1.0"

if _install_bundle_excepthook():
    _install_runner_log_filters()
