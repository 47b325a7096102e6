"""`python -m mmdata preprocess ...`."""

from mmdata.cli import entry

entry()
