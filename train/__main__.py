"""`accelerate launch -m train CONFIG [options]`: `animagine-lora train CONFIG [options]` on every process."""

import sys

from train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
