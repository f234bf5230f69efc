"""NormYOLO train entry point (placeholder until its issue lands)."""
import sys


def main() -> int:
    print("train.py: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
