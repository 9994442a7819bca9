"""torchrun --nproc_per_node N -m virst.train ...: `virst train` on every rank."""

import sys

from virst.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
