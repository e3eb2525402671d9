"""PURE: Perceive, Understand and REstore real-world images with an autoregressive multimodal model."""

__version__ = "0.1.0"
