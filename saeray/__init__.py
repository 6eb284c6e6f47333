"""saeray: distributed batch processing for sparse-autoencoder feature analysis."""

__version__ = "0.1.0"
