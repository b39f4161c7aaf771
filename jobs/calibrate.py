import sys

from raycache.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("calibrate"))
