"""Torch-free checkpoint indexing, layer reads and splitting over fsspec."""
