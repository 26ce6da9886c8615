"""Generated stubs of the ``rest.retriever.v1`` proto package (``python scripts/gen_proto.py``)."""
