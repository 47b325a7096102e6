"""Preprocessing: input rows -> partitions -> per-modality encoders -> shards (see pipeline.py)."""
