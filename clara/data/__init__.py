"""Data: corpora and chunking, training records, derived stage-2/3 records, JSON Lines input."""
