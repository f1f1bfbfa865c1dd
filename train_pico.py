"""GPT-2's training in one file of NumPy: the backward pass, AdamW and the loop. gpt2_pico.py is the forward pass.

Each backward quotes the line it differentiates, takes its output's gradient and its inputs, and recomputes the rest."""
import math
from pathlib import Path

import numpy as np

from gpt2_pico import ffn, gelu, gpt2, layer_norm, linear, softmax


def gelu_backward(dout, x):  # [...] -> [...]
    # gelu(x) = 0.5 * x * (1 + tanh(u)), u = sqrt(2 / pi) * (x + 0.044715 * x**3); tanh's derivative is 1 - tanh**2
    tanh_u = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
    return dout * 0.5 * (1 + tanh_u + x * (1 - tanh_u * tanh_u) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x))


def layer_norm_backward(dout, x, g, b, eps=1e-5):  # [n_batch, n_seq, n_embd] -> same, {g, b}
    # layer_norm = g * x_hat + b, x_hat = (x - mean) / sqrt(variance + eps); x moves its row's mean and variance too
    rstd = 1 / np.sqrt(np.var(x, axis=-1, keepdims=True) + eps)
    x_hat = (x - np.mean(x, axis=-1, keepdims=True)) * rstd
    dx_hat = dout * g
    dx = rstd * (dx_hat - np.mean(dx_hat, axis=-1, keepdims=True) - x_hat * np.mean(dx_hat * x_hat, -1, keepdims=True))
    return dx, {"g": np.sum(dout * x_hat, axis=(0, 1)), "b": np.sum(dout, axis=(0, 1))}


def linear_backward(dout, x, w, b):  # [..., n_out], [..., n_in], [n_in, n_out], [n_out] -> [..., n_in], {w, b}
    # linear = x @ w + b: the same w and b at every position, so their gradients add up over all the positions
    x_rows, dout_rows = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return dout @ w.T, {"w": x_rows.T @ dout_rows, "b": np.sum(dout_rows, axis=0)}


def ffn_backward(dout, x, c_fc, c_proj):  # [n_batch, n_seq, n_embd] -> same, {c_fc, c_proj}
    # ffn = linear(gelu(linear(x, **c_fc)), **c_proj): the chain rule, outermost first
    hidden = linear(x, **c_fc)
    dgelu, dc_proj = linear_backward(dout, gelu(hidden), **c_proj)
    dx, dc_fc = linear_backward(gelu_backward(dgelu, hidden), x, **c_fc)
    return dx, {"c_fc": dc_fc, "c_proj": dc_proj}


def attention_weights(q, k):  # [n_batch, n_head, n_seq, d] x 2 -> [n_batch, n_head, n_seq, n_seq]
    causal_mask = (1 - np.tri(q.shape[-2], dtype=q.dtype)) * -1e10  # a token must not see the ones after it
    return softmax(q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + causal_mask)


def attention_backward(dout, q, k, v):  # [n_batch, n_head, n_seq, d] x 4 -> dq, dk, dv
    # attention = attention_weights(q, k) @ v, the weights softmax(q @ k.T / sqrt(d) + causal_mask)
    weights = attention_weights(q, k)
    dweights = dout @ v.swapaxes(-1, -2)
    # weights = softmax(scores): raising a score raises its weight and, the weights summing to 1, lowers them all
    dscores = weights * (dweights - np.sum(dweights * weights, axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])
    return dscores @ k, dscores.swapaxes(-1, -2) @ q, weights.swapaxes(-1, -2) @ dout


def split_heads(x, n_head):  # [n_batch, n_seq, n_head * d] -> [n_batch, n_head, n_seq, d]
    return x.reshape(*x.shape[:2], n_head, -1).swapaxes(1, 2)


def merge_heads(x):  # [n_batch, n_head, n_seq, d] -> [n_batch, n_seq, n_head * d], side by side as np.hstack puts them
    return x.swapaxes(1, 2).reshape(x.shape[0], x.shape[2], -1)


def mha(x, c_attn, c_proj, n_head):  # [n_batch, n_seq, n_embd] -> [n_batch, n_seq, n_embd]
    # gpt2_pico.mha with the heads an axis instead of a list: every head of every sequence at once
    q, k, v = np.split(split_heads(linear(x, **c_attn), 3 * n_head), 3, axis=1)  # the q heads, then k's, then v's
    return linear(merge_heads(attention_weights(q, k) @ v), **c_proj)


def mha_backward(dout, x, c_attn, c_proj, n_head):  # [n_batch, n_seq, n_embd] -> same, {c_attn, c_proj}
    # mha = linear(merge_heads(attention_weights(q, k) @ v), **c_proj), q, k, v the heads of linear(x, **c_attn)
    q, k, v = np.split(split_heads(linear(x, **c_attn), 3 * n_head), 3, axis=1)
    dmerged, dc_proj = linear_backward(dout, merge_heads(attention_weights(q, k) @ v), **c_proj)
    dq, dk, dv = attention_backward(split_heads(dmerged, n_head), q, k, v)
    dx, dc_attn = linear_backward(merge_heads(np.concatenate([dq, dk, dv], axis=1)), x, **c_attn)
    return dx, {"c_attn": dc_attn, "c_proj": dc_proj}


def transformer_block_backward(dout, x, middle, mlp, attn, ln_1, ln_2, n_head):  # [n_batch, n_seq, n_embd] -> same
    # x = x + ffn(layer_norm(x, **ln_2), **mlp): the residual passes dout on unchanged, the ffn adds its part
    dnormed_2, dmlp = ffn_backward(dout, layer_norm(middle, **ln_2), **mlp)
    dmiddle, dln_2 = layer_norm_backward(dnormed_2, middle, **ln_2)
    dmiddle += dout
    # x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head)
    dnormed_1, dattn = mha_backward(dmiddle, layer_norm(x, **ln_1), **attn, n_head=n_head)
    dx, dln_1 = layer_norm_backward(dnormed_1, x, **ln_1)
    return dx + dmiddle, {"ln_1": dln_1, "attn": dattn, "ln_2": dln_2, "mlp": dmlp}


def gpt2_forward(inputs, wte, wpe, blocks, ln_f, n_head):  # [n_batch, n_seq] -> [n_batch, n_seq, n_vocab], stream
    # gpt2_pico.gpt2 on a batch, keeping only the residual stream; each backward recomputes the rest: less to track
    stream = [wte[inputs] + wpe[range(inputs.shape[1])]]
    for block in blocks:  # transformer_block's two lines
        stream.append(stream[-1] + mha(layer_norm(stream[-1], **block["ln_1"]), **block["attn"], n_head=n_head))
        stream.append(stream[-1] + ffn(layer_norm(stream[-1], **block["ln_2"]), **block["mlp"]))
    return layer_norm(stream[-1], **ln_f) @ wte.T, stream


def cross_entropy(logits, targets):  # [n_batch, n_seq, n_vocab], [n_batch, n_seq] -> mean loss, dlogits
    # loss = mean(-log(softmax(logits)[target])): its gradient is softmax(logits) - one_hot(target), averaged
    probs, one_hot = softmax(logits), targets[..., None] == np.arange(logits.shape[-1])  # True at each target
    return float(-np.mean(np.log(probs[one_hot]))), (probs - one_hot) / targets.size


def loss_and_grads(inputs, targets, params, n_head):  # [n_batch, n_seq] ids, next ids -> mean loss, grads like params
    logits, stream = gpt2_forward(inputs, **params, n_head=n_head)
    loss, dlogits = cross_entropy(logits, targets)
    # logits = layer_norm(x, **ln_f) @ wte.T: a linear layer with w = wte.T; wte gets this gradient and the embedding's
    dfinal, dprojection = linear_backward(dlogits, layer_norm(stream[-1], **params["ln_f"]), params["wte"].T, 0)
    dx, dln_f = layer_norm_backward(dfinal, stream[-1], **params["ln_f"])
    dblocks = []
    for x, middle, block in reversed(list(zip(stream[::2], stream[1::2], params["blocks"]))):
        dx, dblock = transformer_block_backward(dx, x, middle, **block, n_head=n_head)
        dblocks.insert(0, dblock)
    # x = wte[inputs] + wpe[range(n_seq)]: np.add.at adds up the rows of a token that comes more than once
    dwte = dprojection["w"].T
    np.add.at(dwte, inputs, dx)
    dwpe = np.zeros_like(params["wpe"])
    dwpe[: inputs.shape[1]] = np.sum(dx, axis=0)  # the same positions in every sequence of the batch
    return loss, {"wte": dwte, "wpe": dwpe, "blocks": dblocks, "ln_f": dln_f}


def leaves(tree):  # the arrays of a params-shaped tree, in the order of its keys; changing one changes the tree
    branches = [tree[key] for key in sorted(tree)] if isinstance(tree, dict) else tree
    return [leaf for branch in branches for leaf in leaves(branch)] if isinstance(tree, (dict, list)) else [tree]


def adamw(params, grads, m, v, step, learning_rate, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8):  # in place
    # m, v: running means of each weight's gradient and its square (from 0: / (1 - beta**step) corrects the start)
    for p, g, m_p, v_p in zip(leaves(params), leaves(grads), m, v):
        m_p += (1 - beta1) * (g - m_p)
        v_p += (1 - beta2) * (g * g - v_p)
        if p.ndim == 2:  # the weight matrices and embeddings shrink a little, apart from what the gradient says
            p *= 1 - learning_rate * weight_decay
        p -= learning_rate * (m_p / (1 - beta1**step)) / (np.sqrt(v_p / (1 - beta2**step)) + eps)


def get_batch(tokens, batch_size, block_size, rng):  # -> inputs, targets [batch_size, block_size] from random places
    rows = tokens[rng.integers(len(tokens) - block_size, size=(batch_size, 1)) + np.arange(block_size + 1)]
    return rows[:, :-1], rows[:, 1:]  # each target is the token after its input


def estimate_loss(tokens, params, n_head, batch_size, block_size, seed):  # -> the mean loss of 20 batches
    rng = np.random.default_rng([seed, 2])  # the same batches each time, so that estimates compare
    return np.mean([cross_entropy(gpt2_forward(inputs, **params, n_head=n_head)[0], targets)[0] for inputs, targets
                    in (get_batch(tokens, batch_size, block_size, rng) for _ in range(20))])


def main(data: str, max_iters=2000, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
         learning_rate=1e-3, eval_interval=250, seed=1337):
    """Train a small GPT from scratch on a text file, one token per byte, and print what it learned to write.

    Args:
        data: the UTF-8 text file to train on; its last 10 % is held out for validation.
        max_iters: optimizer steps to train for.
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: width; a multiple of n_head.
        block_size: tokens of context trained on.
        batch_size: sequences per step.
        learning_rate: the peak learning rate, reached in 100 steps; a cosine takes it down to 1e-4 at the end.
        eval_interval: print the train and validation loss every this many steps.
        seed: seeds the weights, the batches and the sample.
    """
    flags = dict(locals())
    from encoder import byte_level_encoder
    from files import read_utf8
    from params import init_params
    from train import check_flags, check_split, check_text_file  # train.py's checks: each mistake is one line

    check_flags(flags)
    check_text_file(Path(data))
    encoder = byte_level_encoder()  # GPT-2's 256 byte tokens, then <|endoftext|>
    with open(data, "rb") as text:  # as train.py reads it: newlines as they are, and the UTF-8 checked
        tokens = np.array(encoder.encode("".join(read_utf8(text, data, 1 << 20))))
    train_tokens, val_tokens = np.split(tokens, [len(tokens) - len(tokens) // 10])
    check_split(data, train_tokens, val_tokens, block_size)
    params = init_params(dict(n_vocab=len(encoder.encoder), n_ctx=block_size, n_embd=n_embd, n_layer=n_layer), seed)
    m, v = [np.zeros_like(p) for p in leaves(params)], [np.zeros_like(p) for p in leaves(params)]
    rng = np.random.default_rng([seed, 1])
    for step in range(max_iters + 1):
        if step % eval_interval == 0 or step == max_iters:
            train_loss, val_loss = (estimate_loss(part, params, n_head, batch_size, block_size, seed)
                                    for part in (train_tokens, val_tokens))
            print(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}", flush=True)
        if step < max_iters:
            _, grads = loss_and_grads(*get_batch(train_tokens, batch_size, block_size, rng), params, n_head)
            # a cosine down to 1e-4, to settle at the end, after 100 steps of warmup while AdamW's v is still unsure
            lr = 1e-4 + (learning_rate - 1e-4) * (1 + math.cos(math.pi * step / max_iters)) / 2
            adamw(params, grads, m, v, step + 1, lr * min(1, (step + 1) / 101))
    ids = encoder.encode("\n")
    for _ in range(300):  # a sample, each byte drawn from the model's probabilities sharpened by temperature 0.8
        probs = softmax(gpt2(ids[-block_size:], **params, n_head=n_head)[-1] / 0.8)
        ids.append(rng.choice(len(probs), p=probs))
    print(encoder.decode(ids))


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
