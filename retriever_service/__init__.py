"""The gRPC retrieval service: a server that answers searches over a datastore, and a client.

``retriever_service.server``  ``retriever-server``: serves a datastore (or some of its shards).
``retriever_service.client``  ``RemoteRetriever``: a ``rest.retriever.Retriever`` over one or more
                              servers, one stream per generation session.
The wire contract is ``proto/rest/retriever/v1/retriever.proto``; its comments are the API docs.
"""
