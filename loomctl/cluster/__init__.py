"""Running loomctl inside the allocations of a cluster's resource manager (Slurm)."""
