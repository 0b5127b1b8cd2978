"""ctscan: shared ML core for COVID-19 chest-CT classification.

Research and decision support only; never a diagnosis. Services under `services/` are
thin shells around this package.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Research and clinical decision support only. This output is not a diagnosis and must "
    "not be used as the sole basis for patient care; a qualified clinician must review the "
    "images and all other clinical information."
)

POSITIVE_LABEL = "covid"
NEGATIVE_LABEL = "non_covid"
