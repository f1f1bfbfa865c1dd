"""GPT-2 in NumPy: the forward pass, fast cached generation, sampling, scoring, and the command line.

The model functions are pure and follow the checkpoint's own names (wte, wpe, c_attn, ln_1, ...).
Generation keeps a key/value cache so each new token costs one pass of a single position.
"""
import codecs
import json
import math
import sys

import numpy as np

from utils import GPT2Error, load_encoder_hparams_and_params, run_cli

EOT = 50256  # <|endoftext|>: GPT-2 was trained with it between documents, so it also starts a fresh one


def gelu(x):  # [...] -> [...]
    # GPT-2's tanh form, 0.5 * x * (1 + tanh(u)) with u = sqrt(2 / pi) * (x + 0.044715 * x**3), evaluated as
    # x / (1 + exp(-2u)): the same function, since 1 + tanh(u) = 2 / (1 + exp(-2u)). NumPy's float32 exp is
    # vectorised and its tanh is not (this is 1.5x faster), and nothing cancels where tanh(u) is near -1.
    # One buffer throughout: on a long prompt every temporary array costs as much as the arithmetic.
    y = x * x
    y *= x
    y *= 0.044715
    y += x
    y *= -2 * math.sqrt(2 / math.pi)
    with np.errstate(over="ignore"):  # exp(-2u) is inf far below zero, where x / inf gives gelu's -0.0
        np.exp(y, out=y)
    y += 1
    return np.divide(x, y, out=y)


def softmax(x):  # [..., n] -> [..., n]
    exp_x = x - x.max(axis=-1, keepdims=True)
    np.exp(exp_x, out=exp_x)  # in place: attention's scores are the largest arrays on a long prompt
    exp_x /= exp_x.sum(axis=-1, keepdims=True)
    return exp_x


def layer_norm(x, g, b, eps: float = 1e-5):  # [..., n_embd] -> [..., n_embd]
    # sums divided by n: what np.mean and np.var compute, without their Python overhead (it shows per token)
    centered = x - x.sum(axis=-1, keepdims=True) / x.shape[-1]
    variance = np.square(centered).sum(axis=-1, keepdims=True) / x.shape[-1]
    centered /= np.sqrt(variance + eps)
    centered *= g
    centered += b
    return centered


def linear(x, w, b):  # [..., m], [m, n], [n] -> [..., n]
    # as one 2-D product: numpy runs [n_batch, n_seq, m] @ w as n_batch products, each reading all of w
    y = x.reshape(-1, x.shape[-1]) @ w
    y += b
    return y.reshape(*x.shape[:-1], w.shape[-1])


def in_row_blocks(fn, x, n_rows=64):  # fn(x) for an fn that keeps the shape, computed a block of rows at a time
    # On a long prompt, a block that fits the CPU's cache stays there through all of fn's passes over it,
    # where the whole array would be read from memory again on each pass
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) <= n_rows:
        return fn(x)
    y = np.empty_like(rows)
    for i in range(0, len(rows), n_rows):
        y[i : i + n_rows] = fn(rows[i : i + n_rows])
    return y.reshape(x.shape)


def ffn(x, c_fc, c_proj):  # [..., n_seq, n_embd] -> [..., n_seq, n_embd]
    return linear(in_row_blocks(gelu, linear(x, **c_fc)), **c_proj)


def attention(q, k, v, mask):  # [..., n_q, d], [..., n_k, d], [..., n_k, d], [..., n_q, n_k] -> [..., n_q, d]
    scores = (q / math.sqrt(q.shape[-1])) @ k.swapaxes(-1, -2)  # scaling q, not the larger [n_q, n_k] scores
    scores += mask
    return softmax(scores) @ v


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
    heads = causal_attention(q, k, v, mask)  # [..., n_head, n_q, d]
    merged = heads.swapaxes(-2, -3).reshape(*x.shape[:-2], q.shape[-2], x.shape[-1])  # [..., n_q, n_embd]
    return linear(merged, **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, mask, kv=None, start=0, last_only=False):
    # [..., n_seq, n_embd] -> the same, or [..., 1, n_embd] for the last position only
    attended = mha(layer_norm(x, **ln_1), **attn, n_head=n_head, mask=mask, kv=kv, start=start, last_only=last_only)
    x = x[..., -1:, :] + attended if last_only else x + attended
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def causal_mask(n_q, n_k):  # -> [n_q, n_k]: query i sits at position n_k - n_q + i and sees keys up to it
    return np.triu(np.full((n_q, n_k), -1e10, dtype=np.float32), k=n_k - n_q + 1)


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
    return x @ wte.T  # GPT-2 ties the output projection to the token embeddings


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
    return x[:, -1] @ params["wte"].T  # the vocabulary projection only where a token is chosen


def new_kv_cache(params, n_head, n_batch, n_max):  # -> per layer [2, n_batch, n_head, n_max, n_embd/n_head]
    head_size = params["wte"].shape[1] // n_head
    # np.zeros is backed by untouched pages: memory is only spent on the positions actually used
    return [np.zeros((2, n_batch, n_head, n_max, head_size), dtype=np.float32) for _ in params["blocks"]]


def filter_probs(probs, top_k=None, top_p=1.0):  # [n_vocab] -> [n_vocab], renormalised
    if top_k is None and top_p >= 1.0:
        return probs  # nothing to filter: skip sorting the vocabulary
    keep = np.ones(len(probs), dtype=bool)
    order = np.argsort(-probs, kind="stable")  # most likely first; ties keep the lower id first
    if top_k is not None:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        # the smallest set of most-likely tokens whose probability reaches top_p
        n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        keep[order[n_keep:]] = False
    filtered = np.where(keep, probs, 0.0)
    return filtered / filtered.sum()


def choose(logits, temperature, top_k, top_p, rng):  # [n_vocab] -> token id
    if temperature == 0:
        return int(np.argmax(logits))
    probs = np.exp(log_softmax(logits.astype(np.float64) / temperature))
    return int(rng.choice(len(probs), p=filter_probs(probs, top_k, top_p)))


def check_sampling(temperature, top_k, top_p, n_vocab):
    if not is_number(temperature) or temperature < 0:
        raise GPT2Error(f"--temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k <= n_vocab):
        raise GPT2Error(f"--top_k must be a whole number from 1 to {n_vocab}, got {top_k!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise GPT2Error(f"--top_p must be a number in (0, 1], got {top_p!r}")


def is_int(value):  # bool is an int to Python, never a count to a user
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value):
    return is_int(value) or isinstance(value, (float, np.floating))


def check_count(n_tokens_to_generate):
    if not is_int(n_tokens_to_generate) or n_tokens_to_generate < 0:
        raise GPT2Error(f"--n_tokens_to_generate must be a whole number >= 0, got {n_tokens_to_generate!r}")


def generate_stream(inputs, params, n_head, n_tokens_to_generate, temperature=0.0, top_k=None, top_p=1.0,
                    seed=None, stop_at_endoftext=True):  # [n_seq] -> iterator of new token ids
    n_ctx, n_vocab = params["wpe"].shape[0], params["wte"].shape[0]
    inputs = list(inputs) or [EOT]  # an empty prompt starts a fresh document
    check_count(n_tokens_to_generate)
    if len(inputs) > n_ctx:
        raise GPT2Error(f"the prompt is {len(inputs)} tokens but this model's context holds {n_ctx}: shorten the prompt")
    check_sampling(temperature, top_k, top_p, n_vocab)
    rng = np.random.default_rng(seed)
    kv_cache = new_kv_cache(params, n_head, 1, min(n_ctx, len(inputs) + n_tokens_to_generate))
    tokens, start = inputs, 0  # tokens: what the cache does not hold yet
    no_pads = np.zeros(1, dtype=int)
    for _ in range(n_tokens_to_generate):
        if start + len(tokens) > n_ctx:
            # the context is full: keep the last n_ctx - 1 tokens and rebuild the cache for their new positions
            inputs = inputs[-(n_ctx - 1):]
            tokens, start = inputs, 0
        logits = next_logits(np.array([tokens]), no_pads, params, n_head, kv_cache, start)[0]
        next_id = choose(logits, temperature, top_k, top_p, rng)
        if next_id == EOT and stop_at_endoftext:
            return
        yield next_id
        start += len(tokens)
        tokens = [next_id]
        inputs.append(next_id)


def generate(inputs, params, n_head, n_tokens_to_generate, **options):  # [n_seq] -> [<= n_tokens_to_generate]
    return list(generate_stream(inputs, params, n_head, n_tokens_to_generate, **options))


def generate_batch(prompts, params, n_head, n_tokens_to_generate, temperature=0.0, top_k=None, top_p=1.0,
                   seed=None, stop_at_endoftext=True):  # n_batch x [n_seq_b] -> n_batch x [<= n_tokens_to_generate]
    n_ctx, n_vocab = params["wpe"].shape[0], params["wte"].shape[0]
    prompts = [list(p) or [EOT] for p in prompts]
    if not prompts:
        raise GPT2Error("no prompts to generate for: give at least one")
    longest = max(len(p) for p in prompts)
    check_count(n_tokens_to_generate)
    if longest + n_tokens_to_generate > n_ctx:  # rows share one window, which cannot slide
        raise GPT2Error(f"in a batch the longest prompt ({longest} tokens) plus n_tokens_to_generate "
                        f"({n_tokens_to_generate}) must fit in the context of {n_ctx}")
    check_sampling(temperature, top_k, top_p, n_vocab)
    rng = np.random.default_rng(seed)
    pads = np.array([longest - len(p) for p in prompts])
    tokens = np.array([[0] * pad + p for pad, p in zip(pads, prompts)])  # pad id 0 is never attended to
    kv_cache = new_kv_cache(params, n_head, len(prompts), longest + n_tokens_to_generate)
    outputs, done, start = [[] for _ in prompts], [False] * len(prompts), 0
    for _ in range(n_tokens_to_generate):
        logits = next_logits(tokens, pads, params, n_head, kv_cache, start)
        start += tokens.shape[1]
        tokens = np.array([[choose(row, temperature, top_k, top_p, rng)] for row in logits])
        for b, (next_id,) in enumerate(tokens):
            done[b] = done[b] or (stop_at_endoftext and next_id == EOT)
            if not done[b]:
                outputs[b].append(int(next_id))
        if all(done):
            break
    return outputs


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


def score(ids, params, n_head):  # [n_seq] -> [n_seq - 1] log-probability of each token after the first
    # Texts longer than the context are scored in windows that advance by half a context, as in Hugging Face's
    # perplexity guide: each token is scored once, with at least half a context before it (after the first window)
    n_ctx = params["wpe"].shape[0]
    if len(ids) < 2:
        raise GPT2Error(f"scoring needs a text of at least 2 tokens, got {len(ids)}")
    logprobs, scored_to = [], 0
    for begin in range(0, len(ids), n_ctx // 2):
        window = ids[begin : begin + n_ctx]
        logp = log_softmax(gpt2(window[:-1], **params, n_head=n_head).astype(np.float64))  # [len - 1, n_vocab]
        n_new = begin + len(window) - max(scored_to, 1)
        logprobs.append(logp[np.arange(len(window) - 1), window[1:]][-n_new:])
        scored_to = begin + len(window)
        if scored_to == len(ids):
            break
    return np.concatenate(logprobs)


def read_text(path):  # a file's text, or standard input's for "-"
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GPT2Error(f"cannot read {path}: {e}") from None


def main(prompt="", n_tokens_to_generate=40, model_size="124M", models_dir="models", model_dir=None,
         temperature=0.0, top_k=None, top_p=1.0, seed=None, stop=(), ignore_endoftext=False,
         prompt_file=None, prompts_file=None, score_file=None, per_token=False):
    """Generate text with GPT-2 (greedy by default), or score a text.

    Args:
        prompt: the text to continue; empty generates unconditionally.
        n_tokens_to_generate: how many tokens to add at most.
        model_size: 124M, 355M, 774M or 1558M; downloaded into models_dir on first use.
        models_dir: where model sizes are kept.
        model_dir: load this folder instead (OpenAI's layout or Hugging Face's with model.safetensors).
        temperature: 0 picks the most likely token; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probability reaches p.
        seed: makes sampling repeatable.
        stop: a string, or a list of strings, that ends generation (not printed).
        ignore_endoftext: keep generating past <|endoftext|>.
        prompt_file: read the prompt from this file ("-" for standard input).
        prompts_file: generate for each line of this file as one batch; prints JSON lines.
        score_file: print the mean negative log-likelihood and perplexity of this file's text.
        per_token: with score_file, also print each token's log-probability.
    """
    if prompt_file is not None and prompt != "":
        raise GPT2Error("give either a prompt or --prompt_file, not both")
    encoder, hparams, params = load_encoder_hparams_and_params(model_size, models_dir, model_dir)
    n_head = hparams["n_head"]
    stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_endoftext=not ignore_endoftext)

    if score_file is not None:
        ids = encoder.encode(read_text(score_file))
        logprobs = score(ids, params, n_head)
        if per_token:
            for next_id, logprob in zip(ids[1:], logprobs):
                print(f"{json.dumps(encoder.decode([next_id]), ensure_ascii=False)}\t{logprob:.6f}")
        nll = -float(np.mean(logprobs))
        print(f"tokens scored: {len(logprobs)}\nmean NLL: {nll:.6f}\nperplexity: {np.exp(nll):.6f}")
    elif prompts_file is not None:
        prompts = read_text(prompts_file).splitlines()
        outputs = generate_batch([encoder.encode(p) for p in prompts], params, n_head, n_tokens_to_generate, **options)
        for prompt, ids in zip(prompts, outputs):
            completion = "".join(stream_text(ids, encoder, stop))
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
    else:
        text = read_text(prompt_file) if prompt_file is not None else str(prompt)
        ids = generate_stream(encoder.encode(text), params, n_head, n_tokens_to_generate, **options)
        for piece in stream_text(ids, encoder, stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()


if __name__ == "__main__":
    run_cli(main)
