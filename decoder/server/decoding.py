"""The decoding core the server drives: ``decoder.batch.BatchDecoder`` when it is installed,
else ``SequentialDecoder`` (the same interface over ``RestGenerator``'s own steps).

``BATCHED`` says which one this process uses; ``/health`` and the startup log report it.
"""

from __future__ import annotations

try:
    from decoder.batch import BatchDecoder, SequenceRequest, SequenceUpdate, StepStats

    BATCHED = True
except ImportError:  # the batched core is not in this installation yet
    from decoder.server.sequential import SequenceRequest, SequenceUpdate, StepStats
    from decoder.server.sequential import SequentialDecoder as BatchDecoder

    BATCHED = False

__all__ = ["BATCHED", "BatchDecoder", "SequenceRequest", "SequenceUpdate", "StepStats"]
