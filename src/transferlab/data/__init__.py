"""Datasets as LightningDataModules: one file per dataset, sharing base.ImageClassificationDataModule."""
