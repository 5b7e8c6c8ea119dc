"""densehybrid: dense open-set semantic segmentation with hybrid anomaly scores."""

__version__ = "0.1.0"
