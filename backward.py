"""GPT-2's backward pass in NumPy: the loss of next-token prediction and its gradient for every parameter.

Laid out as llm.c's train_gpt2.c is: each piece of the model has a forward that also returns what its backward
needs, and beside it the backward, which writes the gradients of its parameters into the subtree it is given
(first argument), takes the gradient of the forward's output next, then what the forward saw and saved, and
returns the gradient of the forward's input. gpt2_backward is gpt2_forward read in reverse.

The math is gpt2.py's model, batched: x is [n_batch, n_seq, n_embd] and the linear layers see it as one
[n_batch * n_seq, n_embd] matrix, so every weight takes part in one 2-D product forward and two backward.
"""
import math

import numpy as np

import machine
from errors import GPT2Error
from gpt2 import causal_mask, column_sums, normalize, row_means, row_sums
from memory import FLOAT32, available_bytes
from params import leaves, tree_map
from threads import MIN_PART_ROWS, blas_threads, in_parts

GELU_SCALE = math.sqrt(2 / math.pi)


def embed_forward(inputs, wte, wpe):  # [n_batch, n_seq] ids -> [n_batch, n_seq, n_embd]
    return wte[inputs] + wpe[: inputs.shape[1]]


def embed_backward(dwte, dwpe, dout, inputs):  # [n_batch, n_seq, n_embd] -> added into dwte, written into dwpe
    # x = wte[inputs] + wpe[:n_seq]
    # np.add.at adds every occurrence of an id: dwte[inputs] += dout would keep only one of a repeated id's rows
    np.add.at(dwte, inputs, dout)
    np.sum(dout, axis=0, out=dwpe[: inputs.shape[1]])
    dwpe[inputs.shape[1] :] = 0  # the positions past n_seq were not used


def layer_norm_forward(x, g, b, eps: float = 1e-5):
    # [..., n_embd] -> out [..., n_embd], and the normalised x_hat [..., n_embd] and 1/std rstd [..., 1]
    x_hat, rstd = normalize(x, eps)
    return x_hat * g + b, x_hat, rstd


def layer_norm_backward(dln, dout, x_hat, rstd, g):  # [..., n_embd] -> dx [..., n_embd]; dln {g, b} written
    # out = x_hat * g + b
    column_sums(dout * x_hat, out=dln["g"])
    column_sums(dout, out=dln["b"])
    dx_hat = dout * g
    # x_hat = (x - mean(x)) * rstd: the mean and the variance depend on every x of the row, hence the two means
    dx = dx_hat - row_means(dx_hat)
    dx_hat *= x_hat
    dx -= x_hat * row_means(dx_hat)
    dx *= rstd
    return dx


def linear_forward(x, w, b):  # [..., n_in], [n_in, n_out], [n_out] -> [..., n_out]
    y = x.reshape(-1, x.shape[-1]) @ w  # one 2-D product for the whole batch
    y += b
    return y.reshape(*x.shape[:-1], w.shape[-1])


def linear_backward(dlinear, dout, x, w):  # [..., n_out] -> dx [..., n_in]; dlinear {w, b} written
    # y = x @ w + b, with x as one [n_rows, n_in] matrix
    dout2, x2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1])
    np.matmul(x2.T, dout2, out=dlinear["w"])
    column_sums(dout2, out=dlinear["b"])
    return (dout2 @ w.T).reshape(*dout.shape[:-1], w.shape[0])


def gelu_forward(x):  # [...] -> gelu(x) [...], and exp_2u [...], the exp(-2 u) its backward needs again
    # gelu(x) = 0.5 * x * (1 + tanh(u)), u = sqrt(2 / pi) * (x + 0.044715 * x**3): gpt2.py's tanh form, computed
    # as x * sigmoid(2 u), the same function (0.5 * (1 + tanh(u)) = sigmoid(2 u)): NumPy's exp is faster than tanh
    y, exp_2u = np.empty(x.shape, np.float32), np.empty(x.shape, np.float32)  # C-ordered: by_rows writes rows

    def part(x, y, exp_2u):
        np.multiply(x, x, out=exp_2u)
        exp_2u *= -2 * GELU_SCALE * 0.044715
        exp_2u -= 2 * GELU_SCALE
        exp_2u *= x
        np.minimum(exp_2u, 80, out=exp_2u)  # exp(80) still fits float32, and sigmoid(-80) = 2e-35 is 0 to gelu
        np.exp(exp_2u, out=exp_2u)
        np.add(exp_2u, 1, out=y)
        np.divide(x, y, out=y)  # x * sigmoid(2 u) = x / (1 + exp(-2 u))

    by_rows(part, x, y, exp_2u)
    return y, exp_2u


def gelu_backward(dout, x, exp_2u):  # [...] -> dx [...]
    # y = x * sig, sig = sigmoid(2 u) = 1 / (1 + exp(-2 u)): dy/dx = sig + x * sig * (1 - sig) * 2 du/dx,
    # du/dx = sqrt(2 / pi) * (1 + 3 * 0.044715 * x**2); 1 - sig is computed as exp(-2 u) * sig, which keeps
    # its digits where sig is near 1
    dx = np.empty(x.shape, np.float32)  # C-ordered: by_rows writes its rows

    def part(dx, dout, x, exp_2u):
        sig = exp_2u + 1
        np.reciprocal(sig, out=sig)
        np.multiply(x, x, out=dx)
        dx *= 2 * GELU_SCALE * 3 * 0.044715
        dx += 2 * GELU_SCALE
        dx *= x
        dx *= exp_2u
        dx *= sig
        dx += 1
        dx *= sig
        dx *= dout

    by_rows(part, dx, dout, x, exp_2u)
    return dx


def by_rows(fn, *arrays):  # fn(*arrays) for an fn that computes each row alone, writing into the arrays it is given
    # on many rows, a part of them per core (NumPy makes each pass on one); the arrays written are C-ordered, so
    # their rows are views
    rows = [a.reshape(-1, a.shape[-1]) for a in arrays]
    in_parts(lambda part: fn(*(r[part] for r in rows)), len(rows[0]), MIN_PART_ROWS)


def split_heads(qkv, n_head):  # [n_batch, n_seq, 3 * n_embd] -> q, k, v, each a view [n_batch, n_head, n_seq, d]
    n_batch, n_seq, _ = qkv.shape
    return qkv.reshape(n_batch, n_seq, 3, n_head, -1).transpose(2, 0, 3, 1, 4)


def by_batch_rows(fn, n_batch, n_seq):  # fn(rows) for slices of the batch's rows: on many, a part of them per core
    in_parts(fn, n_batch, min_part=-(-MIN_PART_ROWS // n_seq))


def attention_forward(qkv, n_head):
    # [n_batch, n_seq, 3 * n_embd] -> heads merged [n_batch, n_seq, n_embd], and att [n_batch, n_head, n_seq, n_seq]
    q, k, v = split_heads(qkv, n_head)
    n_batch, _, n_seq, d = q.shape
    mask = causal_mask(n_seq, n_seq)
    att = np.empty((n_batch, n_head, n_seq, n_seq), np.float32)
    y = np.empty((n_batch, n_seq, n_head, d), np.float32)

    def part(rows):  # each row of the batch attends alone
        a = att[rows]
        np.matmul(q[rows], k[rows].swapaxes(-1, -2), out=a)
        a *= 1 / math.sqrt(d)
        a += mask
        a -= np.max(a, axis=-1, keepdims=True)
        np.exp(a, out=a)
        a /= row_sums(a)
        np.matmul(a, v[rows], out=y[rows].transpose(0, 2, 1, 3))  # each head straight into its columns of the merge

    by_batch_rows(part, n_batch, n_seq)
    return y.reshape(n_batch, n_seq, n_head * d), att


def attention_backward(dout, qkv, att, n_head):  # [n_batch, n_seq, n_embd] -> dqkv [n_batch, n_seq, 3 * n_embd]
    q, k, v = split_heads(qkv, n_head)
    n_batch, _, n_seq, d = q.shape
    dy = dout.reshape(n_batch, n_seq, n_head, d).transpose(0, 2, 1, 3)
    dqkv = np.empty((n_batch, n_seq, 3 * n_head * d), np.float32)
    dq, dk, dv = split_heads(dqkv, n_head)

    def part(rows):  # each row of the batch alone
        # y = att @ v
        np.matmul(att[rows].swapaxes(-1, -2), dy[rows], out=dv[rows])
        datt = dy[rows] @ v[rows].swapaxes(-1, -2)
        # att = softmax(scores): dscores = att * (datt - sum(att * datt)); the masked scores have att = 0
        dscores = datt * att[rows]
        datt -= row_sums(dscores)
        np.multiply(att[rows], datt, out=dscores)
        # scores = q @ k.T / sqrt(d)
        dscores *= 1 / math.sqrt(d)
        np.matmul(dscores, k[rows], out=dq[rows])
        np.matmul(dscores.swapaxes(-1, -2), q[rows], out=dk[rows])

    by_batch_rows(part, n_batch, n_seq)
    return dqkv


def block_forward(x, ln_1, attn, ln_2, mlp, n_head):  # [n_batch, n_seq, n_embd] -> same, and what the backward needs
    saved = {}
    # x = x + mha(layer_norm(x, **ln_1), **attn)
    saved["ln_1"], saved["ln_1_hat"], saved["ln_1_rstd"] = layer_norm_forward(x, **ln_1)
    saved["qkv"] = linear_forward(saved["ln_1"], **attn["c_attn"])
    saved["heads"], saved["att"] = attention_forward(saved["qkv"], n_head)
    x = x + linear_forward(saved["heads"], **attn["c_proj"])
    # x = x + ffn(layer_norm(x, **ln_2), **mlp)
    saved["ln_2"], saved["ln_2_hat"], saved["ln_2_rstd"] = layer_norm_forward(x, **ln_2)
    saved["fc"] = linear_forward(saved["ln_2"], **mlp["c_fc"])
    saved["gelu"], saved["gelu_exp_2u"] = gelu_forward(saved["fc"])
    x += linear_forward(saved["gelu"], **mlp["c_proj"])
    return x, saved


def block_backward(dblock, dout, saved, ln_1, attn, ln_2, mlp, n_head):  # [n_batch, n_seq, n_embd] -> dx, same
    # x = x + ffn(layer_norm(x, **ln_2), **mlp): the residual passes dout on unchanged, the ffn adds its part
    dgelu = linear_backward(dblock["mlp"]["c_proj"], dout, saved["gelu"], mlp["c_proj"]["w"])
    dfc = gelu_backward(dgelu, saved["fc"], saved["gelu_exp_2u"])
    dln_2 = linear_backward(dblock["mlp"]["c_fc"], dfc, saved["ln_2"], mlp["c_fc"]["w"])
    dx = dout + layer_norm_backward(dblock["ln_2"], dln_2, saved["ln_2_hat"], saved["ln_2_rstd"], ln_2["g"])
    # x = x + mha(layer_norm(x, **ln_1), **attn)
    dheads = linear_backward(dblock["attn"]["c_proj"], dx, saved["heads"], attn["c_proj"]["w"])
    dqkv = attention_backward(dheads, saved["qkv"], saved["att"], n_head)
    dln_1 = linear_backward(dblock["attn"]["c_attn"], dqkv, saved["ln_1"], attn["c_attn"]["w"])
    dx += layer_norm_backward(dblock["ln_1"], dln_1, saved["ln_1_hat"], saved["ln_1_rstd"], ln_1["g"])
    return dx


def cross_entropy_forward(logits, targets):  # [n_rows, n_vocab], [n_rows] -> mean loss, and probs [n_rows, n_vocab]
    # loss = mean(logsumexp(logits) - logits[target]); the softmax is computed in logits' own buffer
    rows = np.arange(len(targets))
    logits -= np.max(logits, axis=-1, keepdims=True)
    target_logits = logits[rows, targets]
    probs = np.exp(logits, out=logits)
    sums = np.sum(probs, axis=-1)
    probs /= sums[:, None]
    return float(np.mean(np.log(sums) - target_logits, dtype=np.float64)), probs


def cross_entropy_backward(probs, targets):  # [n_rows, n_vocab], [n_rows] -> dlogits [n_rows, n_vocab], in probs
    # loss = mean(-log softmax(logits)[target]): dlogits = (softmax(logits) - one_hot(target)) / n_rows
    probs[np.arange(len(targets)), targets] -= 1
    probs *= 1 / len(targets)
    return probs


def gpt2_forward(inputs, targets, wte, wpe, blocks, ln_f, n_head, for_backward=True):
    # [n_batch, n_seq] ids, [n_batch, n_seq] next ids -> the mean loss, and the activations gpt2_backward reads
    saved = {"blocks": []}
    x = embed_forward(inputs, wte, wpe)
    for block in blocks:
        x, saved_block = block_forward(x, **block, n_head=n_head)
        if for_backward:  # else each block's activations are freed as soon as the next block has run
            saved["blocks"].append(saved_block)
    saved["ln_f"], saved["ln_f_hat"], saved["ln_f_rstd"] = layer_norm_forward(x, **ln_f)
    final = saved["ln_f"].reshape(-1, wte.shape[1])
    logits = final @ wte.T  # the output projection is tied to the token embeddings
    loss, saved["probs"] = cross_entropy_forward(logits, targets.reshape(-1))
    return loss, saved


def gpt2_backward(grads, saved, inputs, targets, wte, wpe, blocks, ln_f, n_head):  # fills grads, a params-shaped tree
    # loss = cross_entropy(logits, targets)
    dlogits = cross_entropy_backward(saved["probs"], targets.reshape(-1))
    # logits = final @ wte.T: the projection's part of wte's gradient; the embedding's is added last
    final = saved["ln_f"].reshape(-1, wte.shape[1])
    np.matmul(dlogits.T, final, out=grads["wte"])
    dfinal = (dlogits @ wte).reshape(saved["ln_f"].shape)
    # final = layer_norm(x, **ln_f)
    dx = layer_norm_backward(grads["ln_f"], dfinal, saved["ln_f_hat"], saved["ln_f_rstd"], ln_f["g"])
    # for block in blocks: x = transformer_block(x, **block)
    for dblock, saved_block, block in reversed(list(zip(grads["blocks"], saved["blocks"], blocks))):
        dx = block_backward(dblock, dx, saved_block, **block, n_head=n_head)
    # x = wte[inputs] + wpe[:n_seq]
    embed_backward(grads["wte"], grads["wpe"], dx, inputs)


def check_batch(inputs, targets, params):  # the mistakes a caller can make with a batch, as GPT2Error
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    (n_vocab, _), (n_ctx, _) = params["wte"].shape, params["wpe"].shape
    if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.size == 0:
        raise GPT2Error(f"inputs and targets must be integer arrays of one shape [n_batch, n_seq], "
                        f"got {inputs.shape} and {targets.shape}")
    if inputs.shape[1] > n_ctx:
        raise GPT2Error(f"inputs have {inputs.shape[1]} positions but this model's context holds {n_ctx}")
    for name, ids in (("inputs", inputs), ("targets", targets)):
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= n_vocab:
            raise GPT2Error(f"{name} must be token ids from 0 to {n_vocab - 1}")
    return inputs, targets


# On more than one core a batch can go two ways. Whole: OpenBLAS's threads share each product, and gelu's and
# attention's passes are cut into parts by rows, but layer norm, softmax and the rest of the element-wise passes run
# on one core. In parts: each core takes a part of the batch through its own forward and backward, with OpenBLAS on
# one thread meanwhile, and the parts' gradients are summed; every pass then runs on all cores, each product on one,
# and each part holds gradients of its own. Which is faster depends on the CPU and on how much of the step the
# passes take against the products: parts took 0.71 of whole's time at 128 wide on the Intel Xeon and 0.84 on an
# AMD EPYC (AVX-512), but at GPT-2 124M's shape 1.05 on the Xeon and 0.88 on the EPYC. So it is measured on the
# first batch of each shape (machine.fastest), and remembered.
def batch_parts(fn, inputs, targets, params, task, in_parts_of_batch, part_bytes=0):
    """-> [(a part's rows, fn(its inputs, its targets)), ...]: over the whole batch at once, or in parts; which, as
    in_parts_of_batch says (True or False), else (None) as this machine runs task at that shape fastest, if each
    part after the first (which holds part_bytes more than the whole batch would) fits in memory."""
    def over(min_part):
        return lambda: in_parts(lambda rows: (rows.stop - rows.start, fn(inputs[rows], targets[rows])), len(inputs),
                                min_part)

    ways = {"whole": over(len(inputs)), "parts": over(1)}
    if not (in_parts_of_batch is None or isinstance(in_parts_of_batch, (bool, np.bool_))):
        raise GPT2Error(f"in_parts_of_batch must be True, False or None (as measured fastest here), "
                        f"got {in_parts_of_batch!r}")
    if in_parts_of_batch is None:
        in_parts_of_batch = (parts_fit(len(inputs), part_bytes)
                             and machine.fastest(batch_task(task, inputs.shape, params), ways) == "parts")
    return ways["parts" if in_parts_of_batch else "whole"]()


def batch_task(task, batch_shape, params):  # -> task at a batch of [n_batch, n_seq], named for the cache with all
    # that its time depends on
    return (f"{task}, batch {batch_shape[0]} x {batch_shape[1]}, {len(params['blocks'])} layers "
            f"{params['wte'].shape[1]} wide, {params['wte'].shape[0]} tokens, {blas_threads()} threads")


def parts_fit(n_batch, part_bytes):  # -> whether a batch of n_batch rows can go in parts, their extra bytes at most
    # half the memory still free: the rest is left for the step's other temporaries
    n_parts, available = min(blas_threads(), n_batch), available_bytes()
    return n_parts > 1 and (available is None or 2 * (n_parts - 1) * part_bytes <= available)


def loss(inputs, targets, params, n_head, in_parts_of_batch=None):  # [n_batch, n_seq] x 2 -> mean cross-entropy
    inputs, targets = check_batch(inputs, targets, params)
    parts = batch_parts(lambda inputs, targets: gpt2_forward(inputs, targets, **params, n_head=n_head,
                                                             for_backward=False)[0], inputs, targets, params,
                        "loss", in_parts_of_batch)
    return sum(n_rows * part_loss for n_rows, part_loss in parts) / len(inputs)


def loss_and_grads(inputs, targets, params, n_head, in_parts_of_batch=None):
    """[n_batch, n_seq] x 2 -> the mean loss, a float, and its gradients, shaped as params. in_parts_of_batch: the
    batch in parts, one on each core (True), or whole (False); None: as this machine runs it fastest."""
    inputs, targets = check_batch(inputs, targets, params)

    def part_loss_and_grads(inputs, targets):
        loss_value, saved = gpt2_forward(inputs, targets, **params, n_head=n_head)
        # not zeroed: each backward writes every element of its gradients (124M's zeros took 67 ms of a step)
        grads = tree_map(lambda a: np.empty(a.shape, np.float32), params)
        gpt2_backward(grads, saved, inputs, targets, **params, n_head=n_head)
        return loss_value, grads

    # each part's gradients are a float32 tree of their own
    parts = batch_parts(part_loss_and_grads, inputs, targets, params, "loss and gradients", in_parts_of_batch,
                        part_bytes=sum(a.size * FLOAT32 for _, a in leaves(params)))
    if len(parts) == 1:
        return parts[0][1]
    # each part's loss and gradients are means over its rows: the batch's are their means weighted by rows
    weights = [np.float32(n_rows / len(inputs)) for n_rows, _ in parts]
    grads = parts[0][1][1]
    for (_, g), *others in zip(leaves(grads), *(leaves(part_grads) for _, (_, part_grads) in parts[1:])):
        g *= weights[0]
        for weight, (_, other) in zip(weights[1:], others):
            other *= weight
            g += other
    return sum(n_rows * part_loss for n_rows, (part_loss, _) in parts) / len(inputs), grads
