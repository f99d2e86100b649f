"""Label-efficiency benchmark: Dice against the number of labelled images for MDM and its baselines.

The code lives in :mod:`monai_mdm.label_efficiency` (the demo uses it too); see ``--help``.
"""

import sys

from monai_mdm.label_efficiency import main

if __name__ == "__main__":
    sys.exit(main())
