import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when servers run beside the tests.
torch.set_num_threads(int(os.environ.get("BRANCHED_TEST_THREADS", "2")))
# Ray Serve gives a new HTTP proxy 5 s to report ready and kills it after three misses; on a loaded 2-core
# machine importing the proxy alone can take longer. Ray's processes inherit this from the test process.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
