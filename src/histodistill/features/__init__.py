"""Features as a product: per-slide extraction to HDF5, context-window extraction, the teacher-feature cache,
export."""
