"""decoder/verify.py: tree-masked logits equal sequential ones, and the tree walk is exact."""

from __future__ import annotations

import math
import random

import pytest
import torch

from decoder.draft_tree import DraftTree
from decoder.kv_cache import BatchedCache
from decoder.model_support import profile_model, sequential_logits
from decoder.sampling import draw, node_chooser, node_paths
from decoder.verify import RowTree, build_tree_batch, forward_tree_batch, prefill, walk_tree
from tests.decoder.helpers import (
    ARCHS,
    ATTENTIONS,
    VOCAB,
    chi_square_pvalue,
    make_model,
    random_level,
    sampling_probs,
    sampling_settings,
)


def tree_paths(tree: DraftTree) -> list[list[int]]:
    return node_paths(tree.tokens, tree.parents)


def batch_logits(model, prefixes: list[list[int]], roots: list[int], trees: list[DraftTree]):
    """Logits [rows, width, vocab] of one tree step over rows of different prefix lengths."""
    profile = profile_model(model)
    kv = BatchedCache()
    with torch.inference_mode():
        for prefix in prefixes:
            kv.append(prefill(model, prefix)[0], len(prefix))
        rows = [RowTree(root, t.tokens, t.parents) for root, t in zip(roots, trees)]
        batch = build_tree_batch(rows, kv.lengths, kv.width, profile, model.dtype, "cpu")
        return forward_tree_batch(model, profile, kv, batch).float()


def tree_logits(model, prefix: list[int], root: int, tree: DraftTree) -> torch.Tensor:
    return batch_logits(model, [prefix], [root], [tree])[0]


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_logits_equal_sequential_logits(arch: str, attn: str) -> None:
    model = make_model(arch, attn)
    rng = random.Random(1)
    # Three rows of different lengths and tree sizes: padding and stale entries stay invisible.
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (7, 2, 12)]
    trees = [DraftTree.from_levels([random_level(rng, size)]) for size in (15, 3, 0)]
    assert max(trees[0].depths()) >= 3 and sum(p < 0 for p in trees[0].parents) >= 2
    logits = batch_logits(model, prefixes, [42, 43, 44], trees)  # [rows, width, vocab]
    assert logits.shape == (3, len(trees[0]) + 1, VOCAB)
    with torch.inference_mode():
        for row, (prefix, root, tree) in enumerate(zip(prefixes, [42, 43, 44], trees)):
            for node, path in enumerate(tree_paths(tree)):
                want = sequential_logits(model, prefix + [root] + path)
                torch.testing.assert_close(logits[row, node], want, atol=1e-4, rtol=0)


def test_a_boolean_mask_would_be_silently_wrong_with_eager_attention() -> None:
    # Why the mask is additive: eager attention adds the mask to the scores, so True/False
    # become +1/+0 and every sibling stays visible, without any error.
    model = make_model("llama", "eager")
    profile = profile_model(model)
    tree = RowTree(8, [10, 11, 12], [-1, -1, 1])
    with torch.inference_mode():
        cache, _ = prefill(model, [5, 6, 7])
        inputs = build_tree_batch([tree], [3], 3, profile, model.dtype, "cpu")
        boolean = inputs.masks[None] == 0
        wrong = model(
            input_ids=inputs.input_ids, attention_mask=boolean, position_ids=inputs.position_ids,
            past_key_values=cache, use_cache=True,
        ).logits[0]  # fmt: skip
        want = sequential_logits(model, [5, 6, 7, 8, 11, 12])
    assert (wrong[3] - want).abs().max() > 1e-2


def test_walk_descends_while_the_model_agrees_then_adds_the_bonus_token() -> None:
    # root -> 5 -> 7, root -> 6; tree indices: 1 = 5, 2 = 6, 3 = 7
    children = ({5: 1, 6: 2}, {7: 3}, {}, {})
    assert walk_tree(children, {0: 5, 1: 7, 3: 9}.__getitem__) == ([0, 1, 3], [5, 7, 9])
    assert walk_tree(children, {0: 6, 2: 4}.__getitem__) == ([0, 2], [6, 4])
    assert walk_tree(children, {0: 8}.__getitem__) == ([0], [8])
    assert walk_tree(children, {0: 5, 1: 6}.__getitem__) == ([0, 1], [5, 6])  # 6 is no child of 5


# Sampling exactness on a tiny-vocabulary model: the distribution of two-token continuations.
SMALL_VOCAB = 8
PROMPT = [3, 4, 5]
PARAMS = dict(temperature=1.0, top_p=0.97, top_k=0)


@pytest.fixture(scope="module")
def setting():
    """The model, the exact two-token distribution of plain sampling, and a draft tree whose
    likeliest first token a is shared by three paths (where the independent scheme is biased)."""
    model = make_model("llama", "sdpa", vocab_size=SMALL_VOCAB, seed=3)
    settings = sampling_settings(model, PROMPT, PARAMS)
    first = sampling_probs(model, settings, PROMPT)
    second = [sampling_probs(model, settings, PROMPT + [t]) for t in range(SMALL_VOCAB)]
    exact = {
        (a, b): first[a].item() * second[a][b].item()
        for a in range(SMALL_VOCAB)
        for b in range(SMALL_VOCAB)
    }
    a, e = first.argsort(descending=True)[:2].tolist()
    b, c, d = second[a].argsort(descending=True)[:3].tolist()
    # The single-token path (e) comes last and cannot out-match the shared token's paths, so
    # under the independent scheme the output starts with a exactly when a path accepts it.
    tree = DraftTree([a, b, c, d, e], [-1, 0, 0, 0, -1], [1.0] * 5)
    logits = tree_logits(model, PROMPT[:-1], PROMPT[-1], tree)
    return settings, first, second, exact, tree, logits


def two_tokens(emitted: list[int], second, generator) -> tuple[int, int]:
    """Complete a one-token step as the next (plain) step would: one draw after the token."""
    if len(emitted) == 1:
        emitted = emitted + [draw(second[emitted[0]], generator)]
    return tuple(emitted[:2])


def tree_walk_sample(settings, tree, logits, second, generator) -> tuple[int, int]:
    context = torch.tensor(PROMPT)
    choose = node_chooser(logits, context, tree.tokens, tree.parents, settings.processors, False,
                          generator)  # fmt: skip
    children = [{} for _ in range(len(tree) + 1)]
    for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        children[parent + 1][token] = node + 1
    _, emitted = walk_tree(children, choose)
    return two_tokens(emitted, second, generator)


def independent_paths_sample(tree, node_probs, second, generator) -> tuple[int, int]:
    """The original REST scheme, for contrast: one independent draw per (path, position), then
    the longest matching path wins."""
    leaves = [i for i in range(len(tree)) if i not in tree.parents]
    best: list[int] = []
    for leaf in leaves:
        path = [leaf]
        while tree.parents[path[0]] >= 0:
            path.insert(0, tree.parents[path[0]])
        node, emitted = 0, []
        for draft_node in path + [None]:
            token = draw(node_probs[node], generator)
            emitted.append(token)
            if draft_node is None or token != tree.tokens[draft_node]:
                break
            node = draft_node + 1
        if len(emitted) > len(best):
            best = emitted
    return two_tokens(best, second, generator)


N_SAMPLES = 4000


def test_tree_walk_samples_exactly_the_plain_sampling_distribution(setting) -> None:
    settings, first, second, exact, tree, logits = setting
    generator = torch.Generator().manual_seed(0)
    samples = [tree_walk_sample(settings, tree, logits, second, generator)
               for _ in range(N_SAMPLES)]  # fmt: skip
    assert chi_square_pvalue(samples, exact) > 0.01
    # The drafts were used: most samples took their first token from the tree.
    shared = tree.tokens[0]
    assert sum(s[0] in (shared, tree.tokens[4]) for s in samples) > 0.2 * N_SAMPLES


def test_the_same_chi_square_test_detects_the_independent_draw_bias(setting) -> None:
    settings, first, second, exact, tree, logits = setting
    context = torch.tensor(PROMPT)
    node_probs = [torch.softmax(settings.processors(context[None], logits[i : i + 1].clone())[0], -1)
                  for i in range(len(tree) + 1)]  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    samples = [
        independent_paths_sample(tree, node_probs, second, generator) for _ in range(N_SAMPLES)
    ]
    assert chi_square_pvalue(samples, exact) < 1e-9
    # The bias is the one the formula predicts: three paths give the shared token three chances.
    p = first[tree.tokens[0]].item()
    freq = sum(s[0] == tree.tokens[0] for s in samples) / N_SAMPLES
    biased = 1 - (1 - p) ** 3
    assert abs(freq - biased) < 4 * math.sqrt(biased * (1 - biased) / N_SAMPLES)
    assert freq > p + 0.1
