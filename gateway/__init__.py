"""The public gateway: MultiProductSearch (detect, crop, sign, search in parallel, merge) and ingestion."""
