"""The `cifar10` command line: one front door to training (`training`) and offline scoring (`scoring`)."""
