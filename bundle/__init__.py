"""The bundle contract: a bundle's manifest, its verified loading into onnxruntime, and the image
decoding every consumer shares. Training writes bundles against it; the service and offline
scoring read them through it. It imports neither BentoML nor torch."""
