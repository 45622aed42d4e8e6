"""Single-row projection (GEMV) kernel of the torch backend: Triton and its PyTorch reference."""
