"""Commission data: URIs, sources, quality checks, split, contamination, packing, prepare."""
