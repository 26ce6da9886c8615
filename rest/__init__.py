"""REST: retrieval-based speculative decoding.

Terms used throughout the project:

- context: the token ids generated so far (prompt + output).
- match length: the length of the longest suffix of the context (between ``min_span`` and
  ``max_span`` tokens) that occurs in the datastore.
- occurrences: how many times that suffix occurs (over all shards).
- continuation tree: the tokens that follow those occurrences, as a trie. Each node is one token;
  its count is the number of occurrences of ``suffix + path to the node``.
- budget: the maximum number of nodes in a continuation (draft) tree.
"""

from rest.types import DatastoreInfo, SearchParams, SearchResult

__all__ = ["DatastoreInfo", "SearchParams", "SearchResult"]
