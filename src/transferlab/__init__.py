"""transferlab: configuration-driven transfer learning on images."""

__version__ = "0.1.0"
