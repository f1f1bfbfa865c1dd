"""GPT-2 in 60 lines of NumPy: the file to read to learn how a GPT works. gpt2.py is the fast version."""
import math

import numpy as np

from errors import GPT2Error


def gelu(x):  # [...] -> [...]
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):  # [..., n] -> [..., n]
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))  # minus the max: same result, no overflow
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):  # [n_seq, n_embd] -> [n_seq, n_embd]
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + eps) + b


def linear(x, w, b):  # [m, in], [in, out], [out] -> [m, out]
    return x @ w + b


def ffn(x, c_fc, c_proj):  # [n_seq, n_embd] -> [n_seq, n_embd]
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # up to 4*n_embd and back


def attention(q, k, v, mask):  # [n_q, d], [n_k, d], [n_k, d], [n_q, n_k] -> [n_q, d]
    return softmax(q @ k.T / math.sqrt(q.shape[-1]) + mask) @ v


def mha(x, c_attn, c_proj, n_head):  # [n_seq, n_embd] -> [n_seq, n_embd]
    x = linear(x, **c_attn)  # [n_seq, 3*n_embd]: queries, keys and values side by side
    qkv_heads = [np.split(part, n_head, axis=-1) for part in np.split(x, 3, axis=-1)]
    causal_mask = (1 - np.tri(x.shape[0], dtype=x.dtype)) * -1e10  # a token must not see the ones after it
    out_heads = [attention(q, k, v, causal_mask) for q, k, v in zip(*qkv_heads)]
    return linear(np.hstack(out_heads), **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head):  # [n_seq, n_embd] -> [n_seq, n_embd]
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head)
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):  # [n_seq] -> [n_seq, n_vocab]
    x = wte[inputs] + wpe[range(len(inputs))]  # what each token is, plus where it is
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head)
    return layer_norm(x, **ln_f) @ wte.T  # scores for every token of the vocabulary


def generate(inputs, params, n_head, n_tokens_to_generate):  # [n_seq] -> [<= n_tokens_to_generate]
    outputs = []
    for _ in range(n_tokens_to_generate):
        next_id = int(np.argmax(gpt2(inputs + outputs, **params, n_head=n_head)[-1]))  # greedy
        if next_id == 50256:  # <|endoftext|>: the model ends the text
            break
        outputs.append(next_id)
    return outputs


def main(prompt="", /, n_tokens_to_generate=40, model_size="124M", models_dir="models"):
    """Continue a text with GPT-2, always picking the most likely next token.

    Args:
        prompt: the text to continue; empty starts a fresh text.
        n_tokens_to_generate: how many tokens to add at most; the prompt and they must fit the context.
        model_size: 124M, 355M, 774M or 1558M, downloaded into models_dir on first use.
        models_dir: where model sizes are kept.
    """
    if n_tokens_to_generate < 0:  # refused before loading, which may mean downloading
        raise GPT2Error(f"n_tokens_to_generate must be >= 0, got {n_tokens_to_generate}", ["n_tokens_to_generate"])
    from utils import load_encoder_hparams_and_params

    encoder, hparams, params = load_encoder_hparams_and_params(model_size, models_dir)
    input_ids = encoder.encode(prompt) or [50256]  # no prompt: start a fresh text
    if len(input_ids) + n_tokens_to_generate > hparams["n_ctx"]:  # the prompt and the new tokens share the context
        raise GPT2Error(f"the prompt ({len(input_ids)} tokens) and n_tokens_to_generate ({n_tokens_to_generate}) must "
                        f"fit the context of {hparams['n_ctx']}", ["n_tokens_to_generate"])
    print(encoder.decode(generate(input_ids, params, hparams["n_head"], n_tokens_to_generate)))


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
