"""Imported once by the fork server that runs isolated cases (see harness._context), so that each
case's child starts with torch, triplet_cuda, the peers and torch.compile's machinery loaded."""
import importlib
import warnings

# torch.compile's internals warn about their own deprecations on every compilation
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")

import torch  # noqa: F401

from . import harness, impls  # noqa: F401

for _name in ("triplet_cuda", "pytorch_metric_learning.losses", "pytorch_metric_learning.miners",
              "torch._dynamo", "torch._inductor.compile_fx"):
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001  (a missing optional peer, or a failed build: the case reports it)
        pass

# Everything imported so far lives as long as the process: keep it out of the garbage
# collector's way, so that each case's gc.collect() is quick (and fork shares more pages).
import gc  # noqa: E402

gc.collect()
gc.freeze()
