"""The captioner's library: the CNNs, search and ensembles; data and features; training's machinery; runtimes and the
PyTorch-free runner; describing a photo. The commands at the project's root use it; it never imports them."""
