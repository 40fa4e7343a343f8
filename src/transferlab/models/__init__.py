"""Backbones (one factory for torchvision and timm), bundled offline weights, the LightningModule."""
