#!/usr/bin/env python3
"""Whole training steps against plain torch and DeepSpeed ZeRO-3 / ZeRO-Infinity: `offload bench e2e`."""

import sys

from offload.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
