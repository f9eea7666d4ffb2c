"""Entry point for `ray job submit`: runs (or resumes) a grid on the cluster it is submitted to.

    export RAY_AUTH_MODE=token            # Ray 2.60 local clusters use token auth by default
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/run_grid.py --config jobs/tiny.yaml --output /shared/runs/tiny

The working directory is uploaded to the cluster; results go to --output, which must be on
storage every node can reach (NFS, EFS, a PVC) for a multi-node cluster. Same as
`tbr-ray ablate`, without needing the console script on the cluster's PATH.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded checkout

from tbr_ray.cli import app  # noqa: E402

if __name__ == "__main__":
    sys.exit(app(["ablate", *sys.argv[1:]]))
