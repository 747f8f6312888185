"""Where a matrix runs: this machine (the default) or a Ray cluster (`--executor ray`)."""
