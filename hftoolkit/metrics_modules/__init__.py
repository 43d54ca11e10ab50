"""Offline `evaluate` modules, one folder each, loaded by `hftoolkit.metrics.load` through `evaluate.load(<folder>)`."""
