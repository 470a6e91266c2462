"""Seeds derived from numbers: random streams that depend on what is sampled, not on where.

Online data samples each completion from a stream seeded by the run's seed, the rollout
block and the prompt's index in the training set (the engine gives each example it hands
to ``rollout`` a ``sample_seed``). A completion then depends on its prompt and the weights
only: not on the batch it shares, the micro-batch size or the number of processes, and a
resumed run draws what the uninterrupted one drew without saving a generator.
"""

from __future__ import annotations

import hashlib

#: Seeds are below 2**63: torch's and vLLM's generators take them as they are.
_BITS = 63


def sample_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` that is a fixed function of ``parts`` (a hash: nearby parts give unrelated seeds).

    ``sample_seed(run_seed, block, index)`` is the ``sample_seed`` the engine gives an example;
    ``sample_seed(example["sample_seed"], j)`` seeds that prompt's ``j``-th completion.
    """
    text = ":".join(str(int(p)) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _BITS)
