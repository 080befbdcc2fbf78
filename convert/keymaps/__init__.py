"""One module per model family, each exporting `SPECS: list[convert.registry.ModelSpec]`."""
