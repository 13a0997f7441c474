import sys

from edge_sdk.serve.cli import main

sys.exit(main())
