"""effx benchmark suites: ``effx bench [family ...] [--json PATH]``.

Every suite returns :class:`effx.bench.harness.Record` rows measured against the machine's
own roofs (copy bandwidth, matmul rate) and against the plain-PyTorch way of doing the same.
"""

from effx.bench import e2e, h2o, kivi, monarch, offload, quant, sparse, tree

SUITES = {
    "quant": quant.run,
    "kivi": kivi.run,
    "h2o": h2o.run,
    "monarch": monarch.run,
    "sparse": sparse.run,
    "offload": offload.run,
    "tree": tree.run,
    "e2e": e2e.run,
}

__all__ = ["SUITES"]
