"""A remote retriever that stops in the middle of a generation: the generation completes, with
exactly the output of plain greedy decoding, and the failures are counted."""

from decoder import DecodingConfig, RestGenerator
from rest.datastore import build_datastore
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from retriever_service.client import RemoteRetriever
from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer, prompts
from tests.retriever_service.service_testing import ServerProcess


def test_server_killed_mid_generation_changes_nothing(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts(1, seed=3)[0]
    expected = hf_greedy(model, prompt, 48)
    # A datastore holding the model's own continuation: drafts are accepted while it is up.
    path = tmp_path / "ds"
    build_datastore(path, [prompt + expected] * 3, vocab_size=VOCAB, tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    server = ServerProcess("--datastore", str(path))
    try:
        retriever = RemoteRetriever(server.address, deadline_s=0.2)
        config = DecodingConfig(budget=16, context_drafts=False)
        generator = RestGenerator(model, tokenizer, retriever, config)
        stream = generator.stream(prompt, 48)
        tokens = []
        for step, chunk in enumerate(stream):
            tokens += chunk.tokens
            if step == 1:
                assert len(tokens) > 2  # the retriever's drafts were accepted before the outage
                server.kill()
        result = stream.result
        retriever.close()
    finally:
        server.kill()
    assert tokens == result.tokens == expected
    assert result.stats.retrieval_failures > 0
    assert result.stats.steps < len(expected)  # it did speed up while the server was up
