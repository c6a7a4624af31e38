"""``python -m nbkernels.demo``: see ``python -m nbkernels.demo --help``."""
from nbkernels.demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
