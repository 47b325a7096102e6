"""Loading: dataset directories -> ordered, resumable batches for PyTorch (see loader.py)."""
