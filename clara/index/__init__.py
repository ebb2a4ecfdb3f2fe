"""The index: the LanceDB schema and table, building it from chunks, retrieving from it."""
