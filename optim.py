"""AdamW as nanoGPT and minGPT use it, in NumPy: the update, global-norm gradient clipping, the learning-rate schedule.

Everything is float32 and updates in place: for GPT-2 124M the weights, their gradients and the two moments are
already 2 GB, so a step must not allocate arrays the size of the model. Each tensor is updated in chunks small
enough to stay in the CPU's cache, which makes the update's several passes cost about one pass over memory.
"""
import math

import numpy as np

from errors import GPT2Error
from params import leaves, tree_map
from threads import in_parts

CHUNK = 1 << 16  # elements per chunk of the update: 256 KiB per array, five arrays fit in a core's L2 cache
MIN_PART_CHUNKS = 4  # the fewest chunks worth a core of their own: a part's hand-off costs about as much as 2 chunks


def adamw_init(params):  # -> {"step": 0, "m": zeros like params, "v": zeros like params}
    def zeros(a):
        return np.zeros(a.shape, np.float32)

    return {"step": 0, "m": tree_map(zeros, params), "v": tree_map(zeros, params)}


def adamw_step(params, grads, state, learning_rate, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """One AdamW step, in place on params and state: torch.optim.AdamW's update with two parameter groups,
    weight decay on every 2-D tensor (the weight matrices and both embeddings) and none on biases and layer norms."""
    state["step"] += 1
    step_size = learning_rate / (1 - beta1 ** state["step"])
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
    tensors = []  # (p, g, m, v, decay) of every parameter, the arrays flat
    for (path, p), (_, g), (_, m), (_, v) in zip(leaves(params), leaves(grads), leaves(state["m"]), leaves(state["v"])):
        if not (isinstance(p, np.ndarray) and p.dtype == np.float32 and p.flags.c_contiguous and p.flags.writeable):
            raise GPT2Error(f"adamw_step updates params in place, but {'/'.join(map(str, path))} is not a writable "
                            "C-ordered float32 array: copy the params first with np.array(a, np.float32, order='C')")
        decay = 1 - learning_rate * weight_decay if p.ndim == 2 else 1.0
        tensors.append((p.reshape(-1), np.ravel(g), m.reshape(-1), v.reshape(-1), decay))
    work = in_chunks([p for p, *_ in tensors])

    def update(part):  # each element is updated alone, so the chunks go in parts, one per core
        scratch = np.empty(CHUNK, np.float32)
        for i, chunk in work[part]:
            p, g, m, v, decay = tensors[i]
            adamw_update(p[chunk], g[chunk], m[chunk], v[chunk], scratch[: p[chunk].size], decay, beta1, beta2, eps,
                         step_size, bias_correction2_sqrt)

    in_parts(update, len(work), MIN_PART_CHUNKS)


def in_chunks(arrays):  # -> [(i, chunk), ...]: arrays[i][chunk] covers every element of each array once
    # a flat array in chunks of CHUNK elements; any other is one chunk of its own
    work = []
    for i, a in enumerate(arrays):
        work += [(i, slice(start, start + CHUNK)) for start in range(0, a.size, CHUNK)] if a.ndim == 1 else [(i, ...)]
    return work


def adamw_update(p, g, m, v, tmp, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):  # 1-D chunks, in place
    # the operations of torch.optim.AdamW (single-tensor path), in its order
    if decay != 1.0:
        p *= decay  # p = p * (1 - lr * weight_decay): decoupled from the gradient
    np.subtract(g, m, out=tmp)  # m = m + (1 - beta1) * (g - m), torch's lerp
    tmp *= 1 - beta1
    m += tmp
    v *= beta2  # v = beta2 * v + (1 - beta2) * g * g
    np.multiply(g, g, out=tmp)
    tmp *= 1 - beta2
    v += tmp
    np.sqrt(v, out=tmp)  # p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    tmp /= bias_correction2_sqrt
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


def clip_grad_norm(grads, max_norm):  # -> the global norm of grads before clipping; grads scaled in place
    # as torch.nn.utils.clip_grad_norm_: one norm over every gradient, all scaled by max_norm / norm if it exceeds
    # max_norm; max_norm = 0 measures without clipping. Both passes go in chunks, a part of them per core
    flat = [g.reshape(-1) if g.flags.c_contiguous else g for _, g in leaves(grads)]  # a view: scaled in place
    work = in_chunks(flat)
    squares = in_parts(lambda part: sum(float(np.vdot(flat[i][chunk], flat[i][chunk])) for i, chunk in work[part]),
                       len(work), MIN_PART_CHUNKS)
    norm = math.sqrt(sum(squares))
    scale = np.float32(max_norm / (norm + 1e-6))

    def clip(part):
        for i, chunk in work[part]:
            flat[i][chunk] *= scale

    if max_norm > 0 and scale < 1:
        in_parts(clip, len(work), MIN_PART_CHUNKS)
    return norm


def learning_rate_at(step, learning_rate, warmup_iters, lr_decay_iters, min_lr):  # -> the learning rate of step
    # nanoGPT's get_lr: a linear warmup, a cosine decay down to min_lr at lr_decay_iters, then min_lr
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    decay_ratio = (step - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)
