import sys

from sandboxd.cli.main import main

sys.exit(main())
