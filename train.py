"""Train PaLM on enwik8 (bytes) and report bits per character; the RLHF stages run from the same command.

    python train.py                         # pretrain the "cpu" preset on enwik8 (downloaded if missing)
    python train.py STAGE --help            # pretrain, make-preferences, sft, reward, ppo, sample

The command line lives in palm_rlhf/cli.py (installed as `palm-rlhf`); the training logic in the library.
"""

from palm_rlhf.cli import run

if __name__ == "__main__":
    run()
