"""Command-line interface: thin click commands over the Python API."""
