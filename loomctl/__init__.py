"""loomctl: run pipelines of many interconnected tasks on a cluster (HyperLoom in Python)."""

__version__ = "0.1.0"
