"""Training data: patch datasets, data modules, transforms, MIL bags, splits, slide context windows."""
