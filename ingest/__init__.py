"""ingest: the write side of knnlm (corpus readers and the ingest worker)."""
