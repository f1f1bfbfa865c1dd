"""The memory a training run needs, counted from its shape before anything is allocated, against the memory the
machine can give it: a run that cannot fit is refused at once, instead of swapping for hours or being killed halfway.

The count follows what backward.py keeps: the weights, their gradients, AdamW's two moments, and the activations
gpt2_forward saves for the backward pass (block_forward's saved dict, per block) with the backward's largest
temporaries. Measured with one OpenBLAS thread, a step's peak resident memory is those arrays within 1-3 %; the
allowances below cover the rest.
"""
import resource

from errors import GPT2Error
from files import size_text

FLOAT32 = 4
HEAP_SLACK = 1.05  # memory the heap keeps when arrays are freed in pieces that later ones cannot reuse
# what does not grow with the model: OpenBLAS's buffers (a second thread added 37 MiB) and the interpreter's heap
RUNTIME_BYTES = 48 << 20


def n_params(hparams):  # the weights of a GPT-2 of these hyperparameters, as many as params.layout() holds
    n_embd = hparams["n_embd"]
    # c_attn [n_embd, 3 n_embd], c_proj [n_embd, n_embd], c_fc [n_embd, 4 n_embd], mlp c_proj [4 n_embd, n_embd],
    # their biases (9 n_embd) and two layer norms (4 n_embd)
    per_block = 12 * n_embd * n_embd + 13 * n_embd
    return (hparams["n_vocab"] + hparams["n_ctx"]) * n_embd + hparams["n_layer"] * per_block + 2 * n_embd


def training_bytes(hparams, batch_size, block_size, n_micro, n_parts=1):
    """-> (the bytes a training step takes at its peak, with its batch in n_parts parts; of those, the weights' and
    AdamW's, and a batch's activations)."""
    state = model_state_bytes(hparams, n_micro, n_parts)
    activations = activation_bytes(hparams, batch_size, block_size)
    return round((state + activations) * HEAP_SLACK) + RUNTIME_BYTES, state, activations


def model_state_bytes(hparams, n_micro, n_parts=1):
    """The weights, their gradients (twice with gradient accumulation: the sum and a micro-batch's; and once more
    for each part of a batch in parts after the first) and AdamW's two moments, all float32."""
    return n_params(hparams) * (4 + (n_micro > 1) + n_parts - 1) * FLOAT32


def activation_bytes(hparams, batch_size, block_size):
    """What a micro-batch of batch_size x block_size tokens adds at the peak of a training step: the end of the
    forward pass, with everything it saved, and the backward's largest temporaries on top."""
    n_rows, n_embd, n_seq = batch_size * block_size, hparams["n_embd"], block_size
    att = batch_size * hparams["n_head"] * n_seq * n_seq  # attention's weights [n_batch, n_head, n_seq, n_seq]
    # ln_1, ln_1_hat, heads, ln_2 and ln_2_hat [n_rows, n_embd]; qkv [n_rows, 3 n_embd]; fc, gelu and
    # gelu_exp_2u [n_rows, 4 n_embd]; the two rstd [n_rows, 1]; att
    per_block = 20 * n_rows * n_embd + 2 * n_rows + att
    # ln_f and ln_f_hat, the residual stream x, and the logits [n_rows, n_vocab], whose buffer becomes the probs
    head = 3 * n_rows * n_embd + 2 * n_rows + n_rows * hparams["n_vocab"]
    # block_backward at its peak, as it ends: dgelu and dfc [n_rows, 4 n_embd] are still held, with dln_2, dx,
    # dheads, dqkv (3 wide), dln_1, layer_norm_backward's three temporaries and the dout it was given; or in
    # attention_backward, with datt, dscores and the copy matmul makes of dscores transposed
    backward = max(19 * n_rows * n_embd, 15 * n_rows * n_embd + 3 * att)
    return (hparams["n_layer"] * per_block + head + backward) * FLOAT32


def available_bytes():
    """The memory this process can still take: /proc/meminfo's MemAvailable, or the room RLIMIT_AS leaves in its
    address space if that is less; None where neither is known."""
    room = []
    meminfo = proc_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        room.append(meminfo["MemAvailable"])
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        room.append(max(0, limit - proc_fields("/proc/self/status").get("VmSize", 0)))
    return min(room) if room else None


def proc_fields(path):  # -> {name: bytes} of the "Name:   123 kB" lines of a /proc file; {} where there is none
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if value.strip().endswith(" kB"):
                    fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return fields


def check_fits(hparams, batch_size, block_size, n_micro, shape_flags):
    """A GPT2Error, before anything is allocated, if a training step of this shape needs more memory than there is
    with its batch whole (it goes in parts only where their gradients fit besides: backward.batch_parts); it names
    the flags that lower it (shape_flags: n_embd and n_layer too, for a model trained from scratch)."""
    needed, state, activations = training_bytes(hparams, batch_size, block_size, n_micro)
    available = available_bytes()
    if available is None or needed <= available:
        return
    needs = (f"a training step needs about {size_text(needed)} of memory ({size_text(state)} for the weights, their "
             f"gradients and AdamW's moments, {size_text(activations)} for a batch's activations, the rest for "
             f"NumPy's working memory), and {size_text(available)} is available")
    if shape_flags:
        raise GPT2Error(f"{needs}: lower batch_size (gradient_accumulation_steps keeps the tokens per step), "
                        "block_size, n_embd or n_layer",
                        arguments=("batch_size", "gradient_accumulation_steps", "block_size", "n_embd", "n_layer"))
    if state > available:  # no batch is small enough
        raise GPT2Error(f"{needs}: fine-tune a smaller model (init_from)", arguments=("init_from",))
    raise GPT2Error(f"{needs}: lower batch_size (gradient_accumulation_steps keeps the tokens per step) or block_size",
                    arguments=("batch_size", "gradient_accumulation_steps", "block_size"))
