"""GPT-2 in NumPy: the forward pass, fast cached generation, sampling, scoring, and the command line.

The model functions are pure and follow the checkpoint's own names (wte, wpe, c_attn, ln_1, ...).
Generation keeps a key/value cache so each new token costs one pass of a single position.
"""
import codecs
import contextlib
import functools
import inspect
import io
import itertools
import json
import math
import os
import re
import stat
import sys
import time
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from encoder import encode_pieces
from errors import GPT2Error, GPT2Warning
from files import read_utf8
from machine import rows_times, vocabulary_times
from threads import MIN_PART_ROWS, in_parts, set_blas_threads
from utils import check_model_choice, load_encoder_hparams_and_params


def gelu(x, out=None):  # [...] -> [...], into out if given (x itself may be out)
    # GPT-2's tanh form, 0.5 * x * (1 + tanh(u)) with u = sqrt(2 / pi) * (x + 0.044715 * x**3), evaluated as
    # x / (1 + exp(-2u)): the same function, since 1 + tanh(u) = 2 / (1 + exp(-2u)). NumPy's float32 exp is
    # vectorised and its tanh is not (this is 1.5x faster), and nothing cancels where tanh(u) is near -1.
    # One buffer throughout: on a long prompt every temporary array costs as much as the arithmetic; and -2u as
    # x * (c1 * x**2 + c0), one pass fewer than summing its two terms.
    y = x * x
    y *= -2 * math.sqrt(2 / math.pi) * 0.044715
    y -= 2 * math.sqrt(2 / math.pi)
    y *= x
    # exp(80) still fits float32, and x / (1 + exp(80)) is gelu's 0 to float32's precision: the clip keeps exp from
    # overflowing without the cost of np.errstate, which a decode step would pay on every layer
    np.minimum(y, 80, out=y)
    np.exp(y, out=y)
    y += 1
    return np.divide(x, y, out=y if out is None else out)


def softmax(x):  # [..., n] -> [..., n]
    exp_x = np.exp(x - x.max(axis=-1, keepdims=True))
    return exp_x / exp_x.sum(axis=-1, keepdims=True)


def row_sums(x):  # [..., n] -> [..., 1]
    # as a product with a vector of ones, which BLAS runs: a batch's [6, 64, 128] in 4.4 µs, where np.mean's reduction
    # along the last axis and its Python took 16.3
    return (x @ ones(x.shape[-1], x.dtype))[..., None]


def row_means(x):  # [..., n] -> [..., 1]
    return row_sums(x) / x.shape[-1]


def column_sums(x, out=None):  # [..., n] -> [n], the sum over every row, into out if given
    # likewise: [384, 512] in 9.4 µs, where np.sum(x, axis=0) took 20.8
    rows = x.reshape(-1, x.shape[-1])
    return np.matmul(ones(len(rows), x.dtype), rows, out=out)


@functools.cache
def ones(n, dtype):  # [n] ones, read-only, made once: np.ones took 10 µs of each layer norm's 47 in a decode step
    vector = np.ones(n, dtype)
    vector.flags.writeable = False
    return vector


def normalize(x, eps: float = 1e-5):  # [..., n] -> each row at mean 0 and variance 1 [..., n], and 1/std [..., 1]
    # The sum of squares as each row's dot product with itself (np.vecdot): the one array of x's size made is the
    # result, which the lines after it update in place (np.mean and np.var would make more, each a pass through
    # memory). On one core: 0.62 ms for 512 rows of 124M, where blocks of rows on two cores took 1.2 (a part's
    # hand-off to a thread costs about what the rows take). np.vecdot took 30.6 µs for those rows against einsum's
    # 54.7, and in a decode step 3.8 µs a row against 16.3
    x_hat = x - row_means(x)
    rstd = 1 / np.sqrt(np.vecdot(x_hat, x_hat)[..., None] / x.shape[-1] + eps)
    x_hat *= rstd  # a product per element costs less than a division
    return x_hat, rstd


def layer_norm(x, g, b, eps: float = 1e-5):  # [..., n_embd] -> [..., n_embd]
    normed, _ = normalize(x, eps)
    normed *= g
    normed += b
    return normed


def linear(x, w, b):  # [..., m], [m, n], [n] -> [..., n]
    # as one 2-D product: numpy runs [n_batch, n_seq, m] @ w as n_batch products, each reading all of w
    y = rows_times(x.reshape(-1, x.shape[-1]), w)
    y += b
    return y.reshape(*x.shape[:-1], w.shape[-1])


def in_row_blocks(update, rows, n_rows=64):  # update(block) for each block of rows [n, m], which it updates in place
    # A block of rows at a time: on a long prompt, a block that fits the CPU's cache stays there through all of
    # update's passes over it, where the whole array would be read from memory again on each pass. And the blocks go
    # in parts, one per core (NumPy would make each pass on one core)
    def blocks(part):
        for begin in range(part.start, part.stop, n_rows):
            update(rows[begin : min(begin + n_rows, part.stop)])

    in_parts(blocks, len(rows), MIN_PART_ROWS)


def ffn(x, c_fc, c_proj):  # [..., n_seq, n_embd] -> [..., n_seq, n_embd]
    # linear(gelu(linear(x, **c_fc)), **c_proj), with c_fc's bias added in the blocks gelu goes in, in the product's
    # own memory: a 512-token prompt's pass of the bias over all of [512, 3072] took 0.4 ms a layer from memory
    hidden = rows_times(x.reshape(-1, x.shape[-1]), c_fc["w"])  # [n_rows, 4 * n_embd]
    in_row_blocks(lambda block: gelu(np.add(block, c_fc["b"], out=block), out=block), hidden)
    return linear(hidden.reshape(*x.shape[:-1], -1), **c_proj)


def attention(q, k, v, mask):  # [..., n_q, d], [..., n_k, d], [..., n_k, d], [..., n_q, n_k] -> [..., n_q, d]
    scores = (q / math.sqrt(q.shape[-1])) @ k.swapaxes(-1, -2)  # scaling q, not the larger [n_q, n_k] scores
    scores += mask
    # softmax(scores) @ v, in the scores' own memory (on a long prompt they are the largest arrays), and with
    # softmax's division by each row's sum done after the product with v, on [n_q, d] instead of [n_q, n_k]
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    return (scores @ v) / scores.sum(axis=-1, keepdims=True)


def causal_attention(q, k, v, mask, chunk=64):  # attention() where the mask hides every later position
    # A long prompt's queries go in chunks, each against only the keys up to its last query: the keys after
    # it would get weight exp(-1e10) = 0 anyway. That skips about half the work, on smaller arrays.
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q <= chunk:
        return attention(q, k, v, mask)
    chunks = []
    for i in range(0, n_q, chunk):
        end = n_k - n_q + min(i + chunk, n_q)  # one past the last key this chunk's last query sees
        queries = slice(i, i + chunk)
        chunks.append(attention(q[..., queries, :], k[..., :end, :], v[..., :end, :], mask[..., queries, :end]))
    return np.concatenate(chunks, axis=-2)


def mha(x, c_attn, c_proj, n_head, mask, kv=None, start=0, last_only=False):
    # [..., n_seq, n_embd] -> [..., n_seq, n_embd], or [..., 1, n_embd] for the last position only
    qkv = linear(x, **c_attn)  # [..., n_seq, 3*n_embd]
    # all heads at once: [..., n_seq, 3, n_head, d] -> [..., 3, n_head, n_seq, d]
    qkv = qkv.reshape(*qkv.shape[:-1], 3, n_head, -1).swapaxes(-4, -3).swapaxes(-3, -2)
    q, k, v = qkv[..., 0, :, :, :], qkv[..., 1, :, :, :], qkv[..., 2, :, :, :]
    if kv is not None:
        # kv is this layer's cache [2, ..., n_head, n_max, d]: keep this chunk's keys and values,
        # then attend over every position so far
        end = start + x.shape[-2]
        kv[0, ..., start:end, :] = k
        kv[1, ..., start:end, :] = v
        k, v = kv[0, ..., :end, :], kv[1, ..., :end, :]
    if last_only:  # every position's keys and values, but only the last one's query
        q, mask = q[..., -1:, :], mask[..., -1:, :]
    # each head attends alone: on a long prompt, a part of the heads per core
    parts = in_parts(lambda part: causal_attention(q[..., part, :, :], k[..., part, :, :], v[..., part, :, :], mask),
                     n_head, min_part=1 if q.shape[-2] >= MIN_PART_ROWS else n_head)
    heads = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-3)  # [..., n_head, n_q, d]
    merged = heads.swapaxes(-2, -3).reshape(*x.shape[:-2], q.shape[-2], x.shape[-1])  # [..., n_q, n_embd]
    return linear(merged, **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, mask, kv=None, start=0, last_only=False):
    # [..., n_seq, n_embd] -> the same, or [..., 1, n_embd] for the last position only
    attended = mha(layer_norm(x, **ln_1), **attn, n_head=n_head, mask=mask, kv=kv, start=start, last_only=last_only)
    x = x[..., -1:, :] + attended if last_only else x + attended
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def causal_mask(n_q, n_k):  # -> [n_q, n_k]: query i sits at position n_k - n_q + i and sees keys up to it
    # by comparing positions: np.triu over a full array took 3.2 ms at 1023 x 1023, this 1.4
    return np.where(np.arange(n_k) > np.arange(n_k - n_q, n_k)[:, None], np.float32(-1e10), np.float32(0))


def hidden_states(inputs, positions, mask, wte, wpe, blocks, ln_f, n_head, kv_cache=None, start=0, last_only=False):
    # [..., n_seq] token ids and positions -> [..., n_seq, n_embd], the final layer-normed states;
    # last_only: [..., 1, n_embd], the last position's, for which the last block needs only that position's
    # query, attention output and MLP (the earlier positions' keys and values still go into kv_cache)
    x = wte[inputs] + wpe[positions]
    for i, (block, kv) in enumerate(zip(blocks, kv_cache or [None] * len(blocks))):
        x = transformer_block(x, **block, n_head=n_head, mask=mask, kv=kv, start=start,
                              last_only=last_only and i == len(blocks) - 1)
    return layer_norm(x, **ln_f)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):  # [n_seq] -> [n_seq, n_vocab]
    n_seq = len(inputs)
    x = hidden_states(np.asarray(inputs), np.arange(n_seq), causal_mask(n_seq, n_seq), wte, wpe, blocks, ln_f, n_head)
    return vocabulary_times(x, wte)  # GPT-2 ties the output projection to the token embeddings


def log_softmax(x):  # [..., n] -> [..., n]
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def next_logits(tokens, pads, params, n_head, kv_cache, start):  # [n_batch, n_new] -> [n_batch, n_vocab]
    # Rows are padded on the left (pads[b] tokens) so every row ends at the same column: positions start at 0
    # at each row's first real token and no query sees a pad key, which makes a row's logits its own
    n_new, end = tokens.shape[1], start + tokens.shape[1]
    positions = np.maximum(np.arange(start, end) - pads[:, None], 0)
    pad_keys = np.where(np.arange(end) < pads[:, None], np.float32(-1e10), np.float32(0))  # [n_batch, end]
    mask = causal_mask(n_new, end) + pad_keys[:, None, None, :]  # [n_batch, 1 (heads), n_new, end]
    x = hidden_states(tokens, positions, mask, **params, n_head=n_head, kv_cache=kv_cache, start=start, last_only=True)
    return vocabulary_times(x[:, -1], params["wte"])  # the vocabulary projection only where a token is chosen


def new_kv_cache(params, n_head, n_batch, n_max):  # -> per layer [2, n_batch, n_head, n_max, n_embd/n_head]
    head_size = params["wte"].shape[1] // n_head
    # Left unset: attention reads only the positions already written. np.zeros would write every position first
    # when malloc hands out reused memory (allocator.keep_freed_memory), 2-4 ms of a 512-token prompt's 530; fresh
    # memory is still only spent on the positions used
    return [np.empty((2, n_batch, n_head, n_max, head_size), dtype=np.float32) for _ in params["blocks"]]


def filter_probs(probs, top_k=None, top_p=1.0, min_p=0.0):  # [n_vocab] -> [n_vocab], renormalised
    if top_k is None and top_p >= 1.0 and min_p == 0:
        return probs  # nothing to filter: skip sorting the vocabulary
    keep = np.ones(len(probs), dtype=bool)
    if top_k is not None or top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # most likely first; ties keep the lower id first
        if top_k is not None:
            keep[order[top_k:]] = False
        if top_p < 1.0:
            # the smallest set of most-likely tokens whose probability reaches top_p
            n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
            keep[order[n_keep:]] = False
    if min_p > 0:
        # min-p, as Hugging Face's MinPLogitsWarper: the tokens at least min_p times as likely as the most likely one
        keep &= probs >= min_p * probs.max()
    filtered = np.where(keep, probs, 0.0)
    return filtered / filtered.sum()


def penalize_repetition(logits, seen, penalty):  # [..., n_vocab], [..., n_vocab] bool -> [..., n_vocab]
    # Hugging Face's RepetitionPenaltyLogitsProcessor (from CTRL): the logit of each token already in the text is
    # divided by the penalty where positive and multiplied by it where negative, so it always falls (penalty > 1)
    with np.errstate(over="ignore"):  # a penalty far from 1 may take a logit to +-inf, which choose expects
        return np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits)


def choose(logits, rng, temperature=0.0, top_k=None, top_p=1.0, min_p=0.0):  # [n_vocab] -> token id
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    peak = logits.max()
    if np.isinf(peak):  # a repetition penalty far from 1 took logits past float32's range: the extreme ones share it all
        logits, peak = np.where(logits == peak, 0.0, -np.inf), 0.0
    # the largest logit subtracted before dividing: a tiny temperature then gives 0 and -inf, never inf - inf
    probs = np.exp(log_softmax((logits - peak) / temperature))
    return int(rng.choice(len(probs), p=filter_probs(probs, top_k, top_p, min_p)))


class Sampling(NamedTuple):
    """How each next token is chosen; the defaults always pick the most likely one (greedy)."""
    temperature: float = 0.0  # 0 picks the most likely token; higher samples more freely
    top_k: int | None = None  # sample only among the k most likely tokens
    top_p: float = 1.0  # sample only among the most likely tokens whose probability reaches p
    min_p: float = 0.0  # sample only among the tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # make each token already in the text less likely (1 means no penalty)
    seed: int | None = None  # the same seed gives the same samples; None or -1 takes a fresh random one


def start_sampling(settings, n_vocab):  # {Sampling's fields} -> (Sampling, the random generator of its seed)
    sampling = Sampling(**settings)
    check_sampling(sampling, n_vocab)
    if sampling.temperature == 0:  # greedy draws nothing: no generator, nor NumPy's random module (5 MiB) loaded
        return sampling, None
    return sampling, np.random.default_rng(None if sampling.seed == -1 else sampling.seed)


def next_token(logits, seen, rng, sampling):  # [n_vocab], [n_vocab] bool -> token id
    check_finite(logits)
    if sampling.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
    return choose(logits, rng, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)


def check_finite(values):  # NaN or inf out of the model: no input causes that, only damaged weights do
    if not np.isfinite(values).all():
        raise GPT2Error("the model produced NaN: its weights are damaged (a logit is NaN or infinite); download or "
                        "export the model again")


def check(ok, argument, requirement, value):  # a GPT2Error that names the argument, unless ok
    if not ok:
        raise GPT2Error(f"{argument} must be {requirement}, got {value!r}", arguments=(argument,))


def warn_no_effect(ignored, why, *also_named):  # also_named: other arguments the reason names
    verb = "has" if len(ignored) == 1 else "have"
    warnings.warn(GPT2Warning(f"{' and '.join(ignored)} {verb} no effect {why}", arguments=[*ignored, *also_named]),
                  stacklevel=3)


def check_sampling(sampling, n_vocab=None):
    """A GPT2Error for a value out of range (top_k's bound once n_vocab is known); a warning for what greedy ignores."""
    temperature, top_k, top_p, min_p, repetition_penalty, seed = sampling
    check(is_number(temperature) and 0 <= temperature < math.inf, "temperature", "a number >= 0 (0 means greedy)",
          temperature)
    check(top_k is None or is_int(top_k) and 1 <= top_k <= (n_vocab or top_k), "top_k",
          f"a whole number from 1 to {n_vocab}" if n_vocab else "a whole number >= 1", top_k)
    check(is_number(top_p) and 0 < top_p <= 1, "top_p", "a number in (0, 1]", top_p)
    check(is_number(min_p) and 0 <= min_p <= 1, "min_p", "a number in [0, 1]", min_p)
    check(is_number(repetition_penalty) and 0 < repetition_penalty < math.inf, "repetition_penalty",
          "a number > 0 (1 means no penalty)", repetition_penalty)
    check(seed is None or is_int(seed) and seed >= -1, "seed", "a whole number >= 0, or -1 for a fresh random one",
          seed)
    if temperature == 0:
        ignored = [name for name, is_set in (("top_k", top_k is not None), ("top_p", top_p < 1), ("min_p", min_p > 0),
                                             ("seed", seed not in (None, -1))) if is_set]
        if ignored:
            warn_no_effect(ignored, "at temperature 0, which always picks the most likely token: give a temperature "
                                    "above 0 to sample")


def is_int(value):  # bool is an int to Python, never a count to a user
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value):
    return is_int(value) or isinstance(value, (float, np.floating))


def check_count(n_tokens_to_generate):
    check(is_int(n_tokens_to_generate) and n_tokens_to_generate >= 0, "n_tokens_to_generate", "a whole number >= 0",
          n_tokens_to_generate)


def token_ids(ids, n_vocab, argument, what="a list of token ids"):  # -> ids as a list, checked
    # a GPT2Error unless each of ids is a token id of a vocabulary of n_vocab, before the model reads wte[ids]: a
    # negative id would read another token's row, and a target past the end a logit of no token
    check(isinstance(ids, Iterable) and not isinstance(ids, str), argument, what, ids)
    ids = list(ids)
    for token_id in ids:
        check(is_int(token_id) and 0 <= token_id < n_vocab, argument,
              f"token ids, whole numbers from 0 to {n_vocab - 1}", token_id)
    return ids


def check_threads(threads):  # None: as many as NumPy's BLAS chose
    # OpenBLAS's setter takes a C int, which ctypes would wrap (2**32 + 1 threads as 1) or refuse with a traceback
    check(threads is None or is_int(threads) and 1 <= threads < 2**31, "threads", "a whole number from 1 to 2**31 - 1",
          threads)


def endoftext(endoftext_id, n_vocab):
    # <|endoftext|>: GPT-2 was trained with it between documents, so it also starts a fresh one. Its id comes from
    # the vocabulary (encoder.encoder["<|endoftext|>"]); by default the last, where GPT-2 and the byte-level
    # tokenizer both put it
    return n_vocab - 1 if endoftext_id is None else endoftext_id


def generate_stream(inputs, params, n_head, n_tokens_to_generate, stop_at_endoftext=True, endoftext_id=None,
                    **sampling):  # [n_seq] -> iterator of new ids; sampling: Sampling's fields, greedy by default
    n_ctx, n_vocab = params["wpe"].shape[0], params["wte"].shape[0]
    eot = endoftext(endoftext_id, n_vocab)
    inputs = token_ids(inputs, n_vocab, "inputs") or [eot]  # an empty prompt starts a fresh document
    check_count(n_tokens_to_generate)
    if len(inputs) > n_ctx:
        raise GPT2Error(f"the prompt is {len(inputs)} tokens but this model's context holds {n_ctx}: shorten the prompt")
    sampling, rng = start_sampling(sampling, n_vocab)
    seen = np.zeros(n_vocab, dtype=bool)  # every token of the text so far, for the repetition penalty
    seen[inputs] = True
    kv_cache = new_kv_cache(params, n_head, 1, min(n_ctx, len(inputs) + n_tokens_to_generate))
    tokens, start = inputs, 0  # tokens: what the cache does not hold yet
    no_pads = np.zeros(1, dtype=int)
    for _ in range(n_tokens_to_generate):
        if start + len(tokens) > n_ctx:
            # the context is full: keep the last n_ctx - 1 tokens and rebuild the cache for their new positions
            inputs = inputs[-(n_ctx - 1):]
            tokens, start = inputs, 0
        logits = next_logits(np.array([tokens]), no_pads, params, n_head, kv_cache, start)[0]
        next_id = next_token(logits, seen, rng, sampling)
        if next_id == eot and stop_at_endoftext:
            return
        yield next_id
        seen[next_id] = True
        start += len(tokens)
        tokens = [next_id]
        inputs.append(next_id)


def generate(inputs, params, n_head, n_tokens_to_generate, **options):  # [n_seq] -> [<= n_tokens_to_generate]
    return list(generate_stream(inputs, params, n_head, n_tokens_to_generate, **options))


def generate_batch_stream(prompts, params, n_head, n_tokens_to_generate, stop_at_endoftext=True, endoftext_id=None,
                          **sampling):
    # n_batch x [n_seq_b] -> iterator of [n_batch] ids, one per step, until every row has chosen <|endoftext|>
    n_ctx, n_vocab = params["wpe"].shape[0], params["wte"].shape[0]
    eot = endoftext(endoftext_id, n_vocab)
    prompts = [token_ids(p, n_vocab, "prompts", "a list of lists of token ids") or [eot] for p in prompts]
    if not prompts:
        raise GPT2Error("no prompts to generate for: give at least one")
    longest = max(len(p) for p in prompts)
    check_count(n_tokens_to_generate)
    if longest + n_tokens_to_generate > n_ctx:  # rows share one window, which cannot slide
        raise GPT2Error(f"in a batch the longest prompt ({longest} tokens) plus n_tokens_to_generate "
                        f"({n_tokens_to_generate}) must fit in the context of {n_ctx}",
                        arguments=("n_tokens_to_generate",))
    sampling, rng = start_sampling(sampling, n_vocab)
    rows = np.arange(len(prompts))
    seen = np.zeros((len(prompts), n_vocab), dtype=bool)  # each row's own tokens, not its pads
    for row, prompt in zip(seen, prompts):
        row[prompt] = True
    pads = np.array([longest - len(p) for p in prompts])
    tokens = np.array([[0] * pad + p for pad, p in zip(pads, prompts)])  # pad id 0 is never attended to
    kv_cache = new_kv_cache(params, n_head, len(prompts), longest + n_tokens_to_generate)
    ended, start = np.zeros(len(prompts), dtype=bool), 0
    for _ in range(n_tokens_to_generate):
        logits = next_logits(tokens, pads, params, n_head, kv_cache, start)
        start += tokens.shape[1]
        next_ids = np.array([next_token(row, row_seen, rng, sampling)
                             for row, row_seen in zip(logits, seen)])
        seen[rows, next_ids] = True
        yield next_ids
        tokens = next_ids[:, None]
        if stop_at_endoftext:
            ended |= next_ids == eot
            if ended.all():
                return


def batch_rows(steps, n_batch, end_id=None):  # iterator of [n_batch] ids -> n_batch x [n_new_b]
    rows = [[] for _ in range(n_batch)]
    for step in steps:
        for row, next_id in zip(rows, step):
            row.append(int(next_id))
    if end_id is not None:  # each row ends before its first end_id
        rows = [row[: row.index(end_id)] if end_id in row else row for row in rows]
    return rows


def generate_batch(prompts, params, n_head, n_tokens_to_generate, stop_at_endoftext=True, endoftext_id=None,
                   **options):  # n_batch x [n_seq_b] -> n_batch x [<= n_tokens_to_generate]
    steps = generate_batch_stream(prompts, params, n_head, n_tokens_to_generate, stop_at_endoftext=stop_at_endoftext,
                                  endoftext_id=endoftext_id, **options)
    end_id = endoftext(endoftext_id, params["wte"].shape[0]) if stop_at_endoftext else None
    return batch_rows(steps, len(prompts), end_id)


def stream_text(ids, encoder, stop=()):  # iterator of token ids -> iterator of text pieces
    # A token can end inside a UTF-8 character, and a stop string can span tokens: hold back both until
    # they are decided, so the pieces joined equal the decoded text, cut before the first stop string
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for next_id in ids:
        pending += utf8.decode(encoder.decode_bytes([next_id]))
        cut = min((i for i in (pending.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            yield pending[:cut]
            return
        held = max((n for s in stop for n in range(len(s) - 1, 0, -1) if pending.endswith(s[:n])), default=0)
        yield pending[: len(pending) - held]
        pending = pending[len(pending) - held :]
    yield pending + utf8.decode(b"", final=True)


# Every control character but newline and tab, written as Python writes it in a string (ESC is \x1b): the C0
# controls, DEL and the C1 controls U+0080-U+009F, which terminals obey as well
CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if chr(code) not in "\n\t"}


def escape_controls(text):  # text with each control character but newline and tab shown as its escape: \x1b
    return text.translate(CONTROL_ESCAPES)


def write_out(text, flush=False):  # text to stdout: exactly as it is, but escaped by escape_controls on a terminal
    # A terminal obeys the control characters in a text (ESC starts sequences that recolour, move the cursor or
    # retitle the window); a pipe or a file gets the text byte for byte
    sys.stdout.write(escape_controls(text) if sys.stdout.isatty() else text)
    if flush:
        sys.stdout.flush()


def target_logprobs(x, targets, wte, n_block=4096):  # [n, n_embd], [n] -> [n] log p(target) under softmax(x @ wte.T)
    # Each row needs only its target's logit and the log of its sum of exponentials, in float32 as the logits are:
    # a float64 log-softmax over the whole vocabulary would cost more than the model. The vocabulary goes n_block
    # tokens at a time, every row against each block, each row's sum rescaled when a larger logit turns up (as
    # flash attention does): the logits in memory stay [n, n_block], and the embedding is read once. Blocks of rows
    # read it once a block instead: 1023 rows of 124M took 306 ms in blocks of 256 rows, 261 in blocks of tokens
    n_rows = len(x)
    peak = np.full(n_rows, -np.inf, dtype=np.float32)  # each row's largest logit so far
    total = np.zeros(n_rows)  # each row's sum of exp(logit - peak) so far: each block's float32 sums added in float64
    target = np.empty(n_rows, dtype=np.float32)
    buffer = np.empty(n_rows * min(n_block, len(wte)), dtype=np.float32)  # one block's logits, reused
    for begin in range(0, len(wte), n_block):
        block = wte[begin : begin + n_block]
        logits = np.matmul(x, block.T, out=buffer[: n_rows * len(block)].reshape(n_rows, len(block)))
        here = np.flatnonzero((targets >= begin) & (targets < begin + len(block)))
        target[here] = logits[here, targets[here] - begin]
        # its passes in parts, one per core (products in parts too took 100 MiB more at 124M, each part OpenBLAS's
        # working memory of its own)
        in_parts(lambda rows: add_exps(logits[rows], peak[rows], total[rows]), n_rows, MIN_PART_ROWS)
    return (target - peak).astype(np.float64) - np.log(total)


def add_exps(logits, peak, total):  # [n, n_block], [n], [n]: a block of logits into peak and total, in place
    new_peak = np.maximum(peak, logits.max(axis=-1))
    total *= np.exp(peak - new_peak)  # exp(-inf) = 0 on the first block
    logits -= new_peak[:, None]
    np.exp(logits, out=logits)
    total += logits.sum(axis=-1)
    peak[...] = new_peak


READ_BYTES = 1 << 16  # how much of a text to score is read at a time: 64 KiB take the tokenizer milliseconds
# The most characters encoded together where the text offers nowhere to cut (encoder.encode_pieces): far more than a
# word or a line has, and few enough that memory stays bounded on one endless run of symbols, such as /dev/zero's NULs
MAX_UNCUT_CHARS = 1 << 16


def score_window(window, n_old, params, n_head):
    # [n_seq] ids, of which the first n_old are already scored (or the text's first) -> [n_new] ids and their
    # log-probabilities, n_new = n_seq - n_old
    window = np.asarray(window)
    n_seq = len(window) - 1
    x = hidden_states(window[:-1], np.arange(n_seq), causal_mask(n_seq, n_seq), **params, n_head=n_head)
    logprobs = target_logprobs(x[n_old - 1 :], window[n_old:], params["wte"])  # the vocabulary only where scored
    check_finite(logprobs)
    return window[n_old:], logprobs


def score_stream(id_chunks, params, n_head):
    # iterable of lists of ids, the text's in order -> iterator of ([n_new] ids, [n_new] log-probabilities), one pair
    # per window. Texts longer than the context are scored in windows that advance by half a context, as in Hugging
    # Face's perplexity guide: each token is scored once, with at least half a context before it (after the first
    # window). Each window is scored as soon as its ids have arrived: memory holds two windows' ids, not the text's
    n_ctx = params["wpe"].shape[0]
    stride = n_ctx // 2
    window, n_old, n_windows = [], 1, 0  # the ids from the window's first on, of which n_old are scored already
    for chunk in id_chunks:
        for begin in range(0, len(chunk), n_ctx):
            window.extend(chunk[begin : begin + n_ctx])
            while len(window) >= n_ctx:
                yield score_window(window[:n_ctx], n_old, params, n_head)
                del window[:stride]
                n_old, n_windows = n_ctx - stride, n_windows + 1
    if len(window) > n_old:
        yield score_window(window, n_old, params, n_head)
    elif not n_windows:
        raise GPT2Error(f"scoring needs a text of at least 2 tokens, got {len(window)}")


def score_windows(ids, params, n_head):  # [n_seq] -> iterator of [n_new] log-probabilities, one array per window
    # the ids checked here, where the API takes them: score_text's come from the tokenizer
    for _, logprobs in score_stream([token_ids(ids, len(params["wte"]), "ids")], params, n_head):
        yield logprobs


def score(ids, params, n_head):  # [n_seq] -> [n_seq - 1] log-probability of each token after the first
    return np.concatenate(list(score_windows(ids, params, n_head)))


def score_text(file, path, encoder, params, n_head, read_bytes=READ_BYTES, bar=None, translate_newlines=True):
    """The log-probabilities of the UTF-8 text in a binary file, read read_bytes at a time and scored as it arrives
    -> iterator of ([n_new] ids, [n_new] log-probabilities), one pair per window (see score_stream).

    The ids are exactly those of encoder.encode(the whole text), except around where a stretch of more than
    MAX_UNCUT_CHARS characters with nowhere to cut (one endless pre-token) had to be cut. bar: a progress bar to
    advance by the bytes read. translate_newlines: \\r\\n and \\r are read as \\n, as Python's text files read them.
    """
    pieces = read_utf8(file, path, read_bytes, bar, translate_newlines)
    return score_stream(encode_pieces(pieces, encoder, MAX_UNCUT_CHARS), params, n_head)


def open_text(path, argument):  # a file to read text from, standard input for "-", None for None
    # argument: the one whose value path is, which the errors name
    if path is None:
        return None
    if path == "-":
        if sys.stdin is None:
            raise GPT2Error(f"cannot read {argument} -: standard input is closed", arguments=(argument,))
        # strictly UTF-8: sys.stdin turns bytes that are not into lone surrogates in some locales (C.UTF-8); and
        # lines end at \n only, as sys.stdin reads them
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise GPT2Error(f"cannot read {argument} {path}: {e.strerror}", arguments=(argument,)) from None


def file_size(file):  # the bytes of a regular file; None for a pipe, a terminal or a device, which have no size
    status = os.fstat(file.fileno())
    return status.st_size if stat.S_ISREG(status.st_mode) else None


@contextlib.contextmanager
def reading(path, argument):  # what goes wrong reading the file at path, as a GPT2Error that names it and argument
    try:
        yield
    except OSError as e:
        raise GPT2Error(f"cannot read {argument} {path}: {e.strerror or e}", arguments=(argument,)) from None
    except UnicodeDecodeError as e:
        raise GPT2Error(f"{argument} {path} is not valid UTF-8 text ({e.reason}): save it as UTF-8",
                        arguments=(argument,)) from None


def read_text(file, path, argument, max_chars=-1):  # the text of a file from open_text, closed; <= max_chars + 1
    with file, reading(path, argument):
        return file.read(max_chars + 1 if max_chars >= 0 else -1)


def max_prompt_chars(encoder, n_ctx):  # the most characters a prompt that fits the context can have
    # n_ctx tokens hold at most n_ctx times the longest token's bytes, and a character is at least one byte
    # (a token's string in the vocabulary has one character per byte)
    return n_ctx * max(len(token) for token in encoder.encoder)


def read_prompt(file, path, encoder, hparams):  # the prompt in a file, refused after a bounded read if it can't fit
    n_ctx = hparams["n_ctx"]
    max_chars = max_prompt_chars(encoder, n_ctx)
    text = read_text(file, path, "prompt_file", max_chars)
    if len(text) > max_chars:
        raise GPT2Error(f"prompt_file {path} holds more than {max_chars} characters, more than this model's context "
                        f"of {n_ctx} tokens can hold: shorten it (score_file scores a text of any length)",
                        arguments=("prompt_file", "score_file"))
    return text


def read_prompts(file, path, encoder, hparams):
    """The prompts in a file from open_text, one per line as str.splitlines splits a text -> iterator of prompts.

    Each line is read with a bound: one no context could hold (/dev/zero is one endless line) is refused after
    reading max_prompt_chars characters of it, naming its line number (lines end at newlines).
    """
    n_ctx = hparams["n_ctx"]
    max_chars = max_prompt_chars(encoder, n_ctx)
    with file:
        for number in itertools.count(1):
            with reading(path, "prompts_file"):
                line = file.readline(max_chars + 1)
            if len(line) > max_chars and not line.endswith("\n"):
                raise GPT2Error(f"line {number} of prompts_file {path} holds more than {max_chars} characters, more "
                                f"than this model's context of {n_ctx} tokens can hold: shorten that line",
                                arguments=("prompts_file",))
            if not line:
                return
            yield from line.splitlines()  # \f, \x1c to \x1e, U+0085, U+2028 and U+2029 end a prompt too


def unescape(text, argument):  # text with the escapes of a Python string literal read: \n, \t, \\, \x41, \u00e9
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unknown escape such as \q is a mistake, not a backslash and a q
            # unicode_escape reads bytes: the runs of characters beyond Latin-1 stay as they are, between the pieces
            # it reads, so that a backslash before one ends its piece and is refused as \é is
            pieces = re.split("([^\x00-\xff]+)", text)
            unescaped = "".join(piece if i % 2 else piece.encode("latin-1").decode("unicode_escape")
                                for i, piece in enumerate(pieces))
    except (UnicodeDecodeError, Warning):
        raise GPT2Error(f'{argument} "{text}" has a backslash that starts no escape: write \\\\ for a backslash '
                        r"(escapes: \n \t \r \\ \xhh \uhhhh)", arguments=(argument,)) from None
    try:  # the two \u escapes of one character beyond U+FFFF (JSON's \ud83d\ude00) become that character
        return unescaped.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise GPT2Error(f'{argument} "{text}" holds half of a surrogate pair, which no text holds: give the whole '
                        r"pair, the character, or its \Uhhhhhhhh escape", arguments=(argument,)) from None


def progress(iterable=None, **options):  # a bar on stderr when it is a terminal, gone when done: stdout stays clean
    from tqdm import tqdm  # here: only the command line shows bars, and tqdm is 3 MiB of every process that imports it

    return tqdm(iterable, file=sys.stderr, disable=None, leave=False, **options)


def timed(steps, times, n_rows=1):  # the same steps (of n_rows tokens each), timed into times
    # The first step's seconds are the prefill's, the others' the decode's
    started = time.perf_counter()
    for n, step in enumerate(steps):
        seconds = time.perf_counter() - started
        times["new_tokens"] += n_rows
        if n == 0:
            times["prefill_s"] += seconds
        else:
            times["decode_s"] += seconds
            times["decode_tokens"] += n_rows
        yield step
        started = time.perf_counter()  # the consumer's time is not the model's


def speed_line(n_prompt, times):  # the line --verbose ends with
    def rate(n_tokens, seconds):
        return f"{n_tokens / seconds:.1f} tokens/s" if seconds > 0 and n_tokens else "-"

    return (f"prompt tokens: {n_prompt}, new tokens: {times['new_tokens']}, "
            f"prefill: {rate(n_prompt, times['prefill_s'])}, decode: {rate(times['decode_tokens'], times['decode_s'])}")


GENERATION_ONLY = ("n_tokens_to_generate", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                   "stop", "ignore_endoftext", "num_samples", "echo")
TEXT_SOURCES = ("prompt", "prompt_file", "prompts_file", "score_file")


def main(prompt: str = "", /, n_tokens_to_generate=40, model_size: str | None = None, models_dir="models",
         model_dir: str | None = None, temperature=0.0, top_k: int | None = None, top_p=1.0, min_p=0.0,
         repetition_penalty=1.0, seed=-1, stop: tuple[str, ...] = (), ignore_endoftext=False, num_samples=1,
         echo=False, prompt_file: str | None = None, prompts_file: str | None = None, score_file: str | None = None,
         per_token=False, threads: int | None = None, verbose=False):
    r"""Generate text with GPT-2 (greedy by default), or score a text.

    Args:
        prompt: the text to continue, exactly as typed; empty starts a fresh text from <|endoftext|>.
        n_tokens_to_generate: how many tokens to add at most.
        model_size: 124M, 355M, 774M or 1558M, downloaded into models_dir on first use (default: 124M).
        models_dir: where model sizes are kept.
        model_dir: load this folder instead (OpenAI's layout, or Hugging Face's with model.safetensors).
        temperature: 0 picks the most likely token; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probability reaches p.
        min_p: sample only among the tokens at least min_p times as likely as the most likely one.
        repetition_penalty: make each token already in the text less likely, as Hugging Face does (1 means none).
        seed: the same seed gives the same samples; -1 takes a fresh random one.
        stop: end the text before this string (not printed); give it again for more; escapes: \n \t \r \\ \xhh \uhhhh.
        ignore_endoftext: keep generating past <|endoftext|>.
        num_samples: sample this many completions of the prompt, the i-th with seed + i; prints JSON lines.
        echo: print the prompt before the continuation.
        prompt_file: read the prompt from this file ("-" for standard input).
        prompts_file: generate for each line of this file, in batches of 8; prints each batch's JSON lines when done.
        score_file: print the mean negative log-likelihood and perplexity of this file's text, of any length.
        per_token: with score_file, first print each token's log-probability.
        threads: how many threads NumPy's BLAS uses (default: one per core).
        verbose: end with a line on stderr: prompt and new tokens, and tokens/s for prefill and decode.
    """
    arguments = dict(locals())
    sampling, stop = check_arguments(arguments)
    if threads is not None:
        set_blas_threads(threads)
    text_argument = next((name for name in TEXT_SOURCES[1:] if arguments[name] is not None), None)
    text_file = open_text(arguments.get(text_argument), text_argument)  # before loading: reported before downloading
    model = load_encoder_hparams_and_params(model_size, models_dir, model_dir)
    options = dict(sampling._asdict(), stop_at_endoftext=not ignore_endoftext,
                   endoftext_id=model[0].encoder.get("<|endoftext|>"))
    times = dict(prefill_s=0.0, decode_s=0.0, decode_tokens=0, new_tokens=0)
    if score_file is not None:
        n_prompt = print_scores(model, text_file, score_file, per_token, times)
    elif prompts_file is not None:
        prompts = read_prompts(text_file, prompts_file, *model[:2])
        n_prompt = print_batches(model, prompts, n_tokens_to_generate, stop, options, times)
    else:
        text = prompt if prompt_file is None else read_prompt(text_file, prompt_file, *model[:2])
        n_prompt = print_samples(model, text, n_tokens_to_generate, stop, num_samples, echo, options, times)
    if verbose:
        print(speed_line(n_prompt, times), file=sys.stderr)


def check_arguments(arguments):
    """What can be checked of main's arguments alone, before anything is downloaded or loaded: a GPT2Error for a
    value or combination that cannot run, a warning for one that has no effect -> (Sampling, the stop strings)."""
    sampling = Sampling(**{name: arguments[name] for name in Sampling._fields})
    changed = [name for name, parameter in inspect.signature(main).parameters.items()
               if arguments[name] != parameter.default]
    num_samples, threads = arguments["num_samples"], arguments["threads"]
    check_count(arguments["n_tokens_to_generate"])
    with warnings.catch_warnings():
        if arguments["score_file"] is not None:  # warn_unused says why scoring ignores them, not what greedy would
            warnings.simplefilter("ignore", GPT2Warning)
        check_sampling(sampling)
    check_model_choice(arguments["model_size"], arguments["model_dir"])
    check(is_int(num_samples) and num_samples >= 1, "num_samples", "a whole number >= 1", num_samples)
    check_threads(threads)
    stop = tuple(unescape(text, "stop") for text in arguments["stop"])
    check(all(stop), "stop", "a non-empty string (an empty one would end the text before it began)", "")
    texts = [name for name in TEXT_SOURCES if name in changed]
    if len(texts) > 1:
        raise GPT2Error(f"{' and '.join(texts)} were given together: give one text to work on", arguments=texts)
    if num_samples > 1 and sampling.temperature == 0:
        raise GPT2Error("num_samples above 1 needs a temperature above 0: greedy decoding gives the same text every "
                        "time", arguments=("num_samples", "temperature"))
    if num_samples > 1 and arguments["prompts_file"] is not None:
        raise GPT2Error("num_samples and prompts_file were given together: sample one prompt, or run a batch",
                        arguments=("num_samples", "prompts_file"))
    warn_unused(arguments, changed)
    return sampling, stop


def warn_unused(arguments, changed):  # a warning for each argument that the others make useless
    unused_by_scoring = [name for name in GENERATION_ONLY if name in changed]
    if arguments["score_file"] is not None and unused_by_scoring:
        warn_no_effect(unused_by_scoring, "with score_file, which generates nothing", "score_file")
    if arguments["model_dir"] is not None and "models_dir" in changed:
        warn_no_effect(["models_dir"], "with model_dir, which names the model's folder itself", "model_dir")
    if arguments["per_token"] and arguments["score_file"] is None:
        warn_no_effect(["per_token"], "without score_file", "score_file")
    if arguments["echo"] and (arguments["prompts_file"] is not None or arguments["num_samples"] > 1):
        warn_no_effect(["echo"], "where the output is JSON lines, which hold the prompt already")


def print_scores(model, file, path, per_token, times):  # -> the number of tokens read
    # the text of file, from open_text, scored as it is read: a per_token line as soon as its window is scored
    encoder, hparams, params = model
    started, n_scored, logprob_sum = time.perf_counter(), 0, 0.0
    with file, progress(total=file_size(file), desc="scoring", unit="B", unit_scale=True) as bar:
        # newlines as file itself reads them: a file open_text opened translates \r\n and \r, standard input does not
        scored = score_text(file.buffer, path, encoder, params, hparams["n_head"], bar=bar,
                            translate_newlines=path != "-")
        for ids, logprobs in scored:
            if per_token:
                write_out("".join(f"{json.dumps(encoder.decode([next_id]), ensure_ascii=False)}\t{logprob:.6f}\n"
                                  for next_id, logprob in zip(ids, logprobs)), flush=True)
            n_scored += len(logprobs)
            logprob_sum += float(np.sum(logprobs))
    times["prefill_s"] = time.perf_counter() - started
    nll = -logprob_sum / n_scored
    write_out(f"tokens scored: {n_scored}\nmean NLL: {nll:.6f}\nperplexity: {np.exp(nll):.6f}\n")
    return n_scored + 1


# Prompts are generated BATCH_ROWS at a time. A batch of 8 decodes 2.5 times as many tokens a second as one prompt at
# 124M (docs/benchmarks.md), and the matrix products bound it: 8 rows take 3 times one row's time, so more rows would
# add little speed, while each row adds its key/value cache (75 MB at 124M and a full context, 630 MB at 1558M) and
# a batch's lines wait for its slowest row
BATCH_ROWS = 8


def print_batches(model, prompts, n_tokens_to_generate, stop, options, times):  # -> the number of prompt tokens
    # the JSON lines of BATCH_ROWS prompts at a time, in order, each batch's as soon as it is done; the k-th batch
    # (from 0) is sampled with seed + k, as --num_samples seeds its samples
    prompts, seed, n_prompt = iter(prompts), options["seed"], 0
    for k, batch in enumerate(iter(lambda: list(itertools.islice(prompts, BATCH_ROWS)), [])):
        batch_seed = seed if seed is None or seed < 0 else seed + k
        n_prompt += print_batch(model, batch, n_tokens_to_generate, stop, options | {"seed": batch_seed}, times)
    if not n_prompt:
        raise GPT2Error("prompts_file holds no prompts to generate for: give one prompt per line",
                        arguments=("prompts_file",))
    return n_prompt


def print_batch(model, prompts, n_tokens_to_generate, stop, options, times):  # -> the number of prompt tokens
    encoder, hparams, params = model
    batch = [encoder.encode(p) for p in prompts]
    steps = generate_batch_stream(batch, params, hparams["n_head"], n_tokens_to_generate, **options)
    steps = progress(timed(steps, times, len(batch)), total=n_tokens_to_generate, desc="generating", unit="step")
    end_id = endoftext(options["endoftext_id"], hparams["n_vocab"]) if options["stop_at_endoftext"] else None
    new_tokens_before = times["new_tokens"]
    outputs = batch_rows(steps, len(batch), end_id)
    times["new_tokens"] = new_tokens_before + sum(len(ids) for ids in outputs)  # not the steps of rows that had ended
    write_out("".join(json.dumps({"prompt": prompt, "completion": "".join(stream_text(ids, encoder, stop))},
                                 ensure_ascii=False) + "\n" for prompt, ids in zip(prompts, outputs)), flush=True)
    return sum(max(len(ids), 1) for ids in batch)


def print_samples(model, prompt, n_tokens_to_generate, stop, num_samples, echo, options, times):
    # one continuation, streamed as it is generated, or num_samples of them as JSON lines, the i-th sampled with
    # seed + i -> the number of prompt tokens
    encoder, hparams, params = model
    ids = encoder.encode(prompt)
    if num_samples == 1:
        if echo:
            write_out(prompt)
        new_ids = timed(generate_stream(ids, params, hparams["n_head"], n_tokens_to_generate, **options), times)
        for piece in stream_text(new_ids, encoder, stop):
            write_out(piece, flush=True)
        write_out("\n")
        return max(len(ids), 1)
    first_seed = options["seed"] if options["seed"] >= 0 else int(np.random.default_rng().integers(2**31))
    for seed in progress(range(first_seed, first_seed + num_samples), desc="sampling", unit="sample"):
        new_ids = generate_stream(ids, params, hparams["n_head"], n_tokens_to_generate, **(options | {"seed": seed}))
        completion = "".join(stream_text(timed(new_ids, times), encoder, stop))
        write_out(json.dumps({"prompt": prompt, "seed": seed, "completion": completion}, ensure_ascii=False) + "\n",
                  flush=True)
    return num_samples * max(len(ids), 1)


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
