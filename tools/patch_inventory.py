#!/usr/bin/env python
"""Print, or write into patches/README.md (--write), the inventory of every runtime patch
this project makes, generated from the declarations in the code
(``megatron_asyncmesh/patching.py``)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_asyncmesh import patching  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true",
                        help="rewrite the generated section of patches/README.md")
    args = parser.parse_args(argv)
    if args.write:
        count = patching.write_readme()
        print(f"wrote {patching.README} ({count} patches)")
    else:
        patching.import_all()
        print(patching.inventory())
    return 0


if __name__ == "__main__":
    sys.exit(main())
