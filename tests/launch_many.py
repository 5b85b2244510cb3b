"""Runs several `train.py` commands one after another in one launch: torchrun then starts Python, torch and the
process group once for all of them (that start-up is most of a small distributed test's time).
argv[1]: a JSON file holding a list of argument lists."""

import json
import os
import sys

from palm_rlhf import cli

for argv in json.loads(open(sys.argv[1]).read()):
    cli.main(argv)
sys.stdout.flush()
os._exit(0)   # PLATFORM.md: gloo threads can abort an otherwise clean interpreter shutdown
