"""Offline scoring: folders and tables of images through a bundle into Parquet or CSV, on this
machine or on Spark (`cifar10 score`). Builds on the bundle contract alone, never on the service."""
