"""effx benchmark suites: ``effx bench [family ...] [--json PATH]``.

Every suite returns :class:`effx.bench.harness.Record` rows measured against the machine's
own roofs (copy bandwidth, matmul rate) and against the plain-PyTorch way of doing the same.
"""

from effx.bench import quant, sparse

SUITES = {
    "quant": quant.run,
    "sparse": sparse.run,
}

__all__ = ["SUITES"]
