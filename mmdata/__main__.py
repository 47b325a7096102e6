"""`python -m mmdata preprocess ...`."""

import sys

from mmdata.cli import main

sys.exit(main())
