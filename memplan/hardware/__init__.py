"""What a GPU is: the catalog of memory, bandwidth, compute and dated prices."""
