"""`python -m mmtrain train ...` (also what torchrun runs: `torchrun -m mmtrain train ...`)."""

import sys

from mmtrain.cli import main

sys.exit(main())
