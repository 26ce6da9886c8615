"""``decoder-server``: an OpenAI-compatible HTTP server over the batched decoder.

Three layers, each knowing only the one below it:

- HTTP (``serving``, with the request and response models in ``protocol``): FastAPI handlers for
  ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health`` and ``/metrics``.
  They turn a request into a ``SequenceRequest`` (prompt ids, generation settings, stop strings,
  drafting on or off), stream the engine's updates back as text (server-sent events when
  ``stream`` is set) and map every error to a status and an OpenAI error body in one place.
- The async engine (``engine``): admits a request (or refuses it with 429 before any work),
  gives it its own queue, and aborts it when its client goes away. It owns one thread that
  drives the decoder; each step's updates are handed to the event loop thread-safely.
- The decoder: ``decoder.batch.BatchDecoder`` (``add``, ``abort``, ``step``), blocking and
  unaware of threads, HTTP and asyncio. Requests join and leave between steps.

``metrics`` turns each step's statistics and each request's outcome into Prometheus text;
``cli`` is the command line (``decoder-server``, or ``python -m decoder.server``).
"""
