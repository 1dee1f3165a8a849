"""SeCo — Separate and Conquer weakly supervised semantic segmentation, as a DVC pipeline."""

__version__ = "0.1.0"
