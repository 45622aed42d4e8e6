"""Build step: kiln checkpoint -> engine dir (graph passes, quantization, plugins, engines)."""
