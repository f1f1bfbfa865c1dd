"""Sampling, streaming, stop strings and scoring: the controls beyond greedy decoding."""
import ast
import tracemalloc
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

import gpt2
from errors import GPT2Error, GPT2Warning

PROMPT = [464, 3290, 286, 1204, 318]


@pytest.fixture
def tiny(loaded_model):
    encoder, hparams, params = loaded_model("tiny")
    return encoder, params, hparams["n_head"]


def test_top_k_of_one_and_vanishing_temperature_give_the_greedy_ids(tiny):
    _, params, n_head = tiny
    greedy = gpt2.generate(PROMPT, params, n_head, 20)
    assert gpt2.generate(PROMPT, params, n_head, 20, temperature=1.0, top_k=1, seed=5) == greedy
    assert gpt2.generate(PROMPT, params, n_head, 20, temperature=1e-6, seed=5) == greedy


def test_the_same_seed_gives_the_same_ids(tiny):
    _, params, n_head = tiny
    runs = [gpt2.generate(PROMPT, params, n_head, 20, temperature=1.0, top_p=0.9, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed, not something else, decides the draw


def test_sampling_draws_from_the_softmax(tiny):
    # with temperature 1 and no filter, each choice is a draw from softmax(logits): the empirical
    # frequency of the most likely token must match its probability
    _, params, n_head = tiny
    logits = gpt2.gpt2(PROMPT, **params, n_head=n_head)[-1]
    probs = gpt2.softmax(logits.astype(np.float64))
    rng = np.random.default_rng(0)
    draws = np.array([gpt2.choose(logits, rng, temperature=1.0) for _ in range(4000)])
    top = int(np.argmax(probs))
    assert abs(np.mean(draws == top) - probs[top]) < 4 * np.sqrt(probs[top] * (1 - probs[top]) / 4000)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40).filter(lambda w: sum(w) > 0),
    st.floats(1e-6, 1.0),
)
def test_top_p_keeps_the_smallest_set_of_tokens_that_reaches_p(weights, top_p):
    probs = np.array(weights) / np.sum(weights)
    kept = gpt2.filter_probs(probs, top_p=top_p) > 0
    # the kept tokens are the most likely ones, their mass reaches p, and without the least likely of
    # them it would not (sums compared with a float tolerance: they are computed in another order)
    assert probs[kept].min() >= probs[~kept].max(initial=0.0)
    assert probs[kept].sum() >= top_p - 1e-12
    assert probs[kept].sum() - probs[kept].min() < top_p + 1e-12
    np.testing.assert_allclose(gpt2.filter_probs(probs, top_p=top_p)[kept], probs[kept] / probs[kept].sum())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40).filter(lambda w: sum(w) > 0), st.integers(1, 40))
def test_top_k_keeps_the_k_most_likely_tokens(weights, top_k):
    probs = np.array(weights) / np.sum(weights)
    kept = gpt2.filter_probs(probs, top_k=top_k) > 0
    assert kept.sum() == min(top_k, np.count_nonzero(probs))
    assert probs[kept].min() >= probs[~kept].max(initial=0.0)


@pytest.mark.parametrize(
    "options, argument",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_k=50258), "top_k"),
        (dict(temperature=1.0, top_k=2.0), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, min_p=-0.1), "min_p"),
        (dict(temperature=1.0, min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(temperature=1.0, seed=-2), "seed"),
        (dict(temperature=1.0, seed=3.5), "seed"),
    ],
)
def test_invalid_sampling_values_are_an_error_that_names_the_argument(tiny, options, argument):
    _, params, n_head = tiny
    for run in (lambda: gpt2.generate(PROMPT, params, n_head, 3, **options),
                lambda: gpt2.generate_batch([PROMPT], params, n_head, 3, **options)):
        with pytest.raises(GPT2Error, match=f"^{argument} must be ") as info:
            run()
        assert "--" not in str(info.value)  # the Python API speaks of arguments; the command line of flags
        assert info.value.arguments == (argument,)


TEXTS = ["日本語のテキスト、中文文本", "emoji 🎉👩‍👩‍👧🇯🇵 and café", "plain ascii, nothing held back"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_equal_the_decoded_text_and_never_split_a_character(tiny, text):
    encoder = tiny[0]
    ids = encoder.encode(text)
    pieces = list(gpt2.stream_text(iter(ids), encoder))
    assert "".join(pieces) == encoder.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 1  # it really streams


def test_stream_stops_before_a_stop_string_even_across_tokens(tiny):
    encoder = tiny[0]
    ids = encoder.encode("The answer is forty-two. The end")
    assert "".join(gpt2.stream_text(iter(ids), encoder, stop=("forty-two",))) == "The answer is "
    assert "".join(gpt2.stream_text(iter(ids), encoder, stop=(". The", "nowhere"))) == "The answer is forty-two"
    assert "".join(gpt2.stream_text(iter(ids), encoder, stop=("nowhere",))) == "The answer is forty-two. The end"


def test_stream_stops_generating_at_the_stop_string(tiny):
    encoder = tiny[0]
    ids = encoder.encode("one two three four")
    consumed = []

    def source():
        for i in ids:
            consumed.append(i)
            yield i

    assert "".join(gpt2.stream_text(source(), encoder, stop=(" two",))) == "one"
    assert len(consumed) == 2


def hugging_face_perplexity_guide_nll(model, ids, n_ctx):
    """Mean NLL over Hugging Face's per-window losses, with the windows of its perplexity guide.

    The guide counts each window's loss tokens as `valid - batch_size`, one too few in every window after
    the first (whose first target has context); the count here is of the labels the model really uses.
    """
    stride, nll_sum, n_tokens, prev_end = n_ctx // 2, 0.0, 0, 0
    input_ids = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        targets = window.clone()
        targets[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=targets).loss
        n_loss_tokens = int((targets[:, 1:] != -100).sum())  # the model shifts labels by one inside
        nll_sum += float(loss) * n_loss_tokens
        n_tokens += n_loss_tokens
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("n_tokens", [20, 100])  # shorter than tiny's n_ctx of 32, and three contexts long
def test_scores_equal_hugging_face_loss(loaded_model, hf_model, n_tokens):
    _, hparams, params = loaded_model("tiny")
    ids = [int(i) for i in np.random.default_rng(n_tokens).integers(0, 50256, n_tokens)]
    logprobs = gpt2.score(ids, params, hparams["n_head"])
    expected_nll, expected_count = hugging_face_perplexity_guide_nll(hf_model("tiny"), ids, hparams["n_ctx"])
    assert len(logprobs) == expected_count == n_tokens - 1
    assert abs(-np.mean(logprobs) - expected_nll) <= 1e-4 * expected_nll


# scale 300: logits in the thousands, whose exp overflows unless shifted, and which float32 holds to a relative 6e-8
@pytest.mark.parametrize("scale, rtol, atol", [(1, 0, 1e-4), (300, 1e-6, 0)])
def test_log_probabilities_of_many_rows_in_parts_on_two_threads_equal_torchs_log_softmax(blas_threads, scale, rtol,
                                                                                         atol):
    rng = np.random.default_rng(0)
    x, wte = scale * rng.standard_normal((300, 64), np.float32), rng.standard_normal((50257, 64), np.float32)
    targets = rng.integers(0, 50257, 300)
    blas_threads(2)
    logprobs = gpt2.target_logprobs(x, targets, wte)  # 13 blocks of the vocabulary, the rows in two parts each
    expected = torch.log_softmax(torch.from_numpy(x).double() @ torch.from_numpy(wte).double().T, dim=-1)
    np.testing.assert_allclose(logprobs, expected[np.arange(300), targets].numpy(), rtol=rtol, atol=atol)


def test_log_probabilities_hold_one_block_of_logits_at_a_time():
    rng = np.random.default_rng(0)
    x, wte = rng.standard_normal((768, 64), np.float32), rng.standard_normal((5000, 64), np.float32)
    targets = rng.integers(0, 5000, len(x))
    block_bytes = len(x) * 1000 * 4
    tracemalloc.start()
    try:
        gpt2.target_logprobs(x, targets, wte, n_block=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert block_bytes < peak < 1.5 * block_bytes, (peak, block_bytes)


def test_scoring_a_single_token_is_a_clear_error(tiny):
    _, params, n_head = tiny
    with pytest.raises(GPT2Error, match="at least 2 tokens"):
        gpt2.score([464], params, n_head)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.05, 5.0), st.lists(st.integers(0, 999), max_size=40))
def test_repetition_penalty_is_hugging_faces(seed, penalty, ids):
    logits = np.random.default_rng(seed).normal(0, 3, 1000).astype(np.float32)
    seen = np.zeros(1000, dtype=bool)
    seen[ids] = True
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids], dtype=torch.long),
                                                       torch.from_numpy(logits[None].copy()))[0].numpy()
    np.testing.assert_array_equal(gpt2.penalize_repetition(logits, seen, penalty), theirs)


def test_greedy_generation_with_a_repetition_penalty_equals_hugging_faces(loaded_model, hf_model):
    encoder, hparams, params = loaded_model("tiny")
    prompt = PROMPT + PROMPT  # repeats already in the prompt are penalised too
    n_new = hparams["n_ctx"] - len(prompt)
    with torch.no_grad():
        expected = hf_model("tiny").generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            repetition_penalty=1.3, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=encoder.encoder["<|endoftext|>"],
        )[0, len(prompt):].tolist()
    ours = gpt2.generate(prompt, params, hparams["n_head"], n_new, repetition_penalty=1.3, stop_at_endoftext=False)
    assert ours == expected
    assert ours != gpt2.generate(prompt, params, hparams["n_head"], n_new, stop_at_endoftext=False)  # it mattered


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.floats(0.1, 10.0))
def test_min_p_keeps_the_tokens_hugging_faces_min_p_keeps(seed, min_p, spread):
    logits = np.random.default_rng(seed).normal(0, spread, 1000)
    probs = np.exp(gpt2.log_softmax(logits))
    theirs = MinPLogitsWarper(min_p)(None, torch.from_numpy(logits[None]))[0].numpy() > -np.inf
    kept = gpt2.filter_probs(probs, min_p=min_p) > 0
    np.testing.assert_array_equal(kept, theirs)
    np.testing.assert_allclose(gpt2.filter_probs(probs, min_p=min_p)[kept], probs[kept] / probs[kept].sum())


def test_min_p_of_one_keeps_only_the_most_likely_token(tiny):
    _, params, n_head = tiny
    greedy = gpt2.generate(PROMPT, params, n_head, 20)
    assert gpt2.generate(PROMPT, params, n_head, 20, temperature=1.0, min_p=1.0, seed=5) == greedy


def test_options_that_greedy_ignores_warn_naming_the_arguments(tiny):
    _, params, n_head = tiny
    with pytest.warns(GPT2Warning, match=r"^top_k and min_p have no effect at temperature 0") as record:
        ids = gpt2.generate(PROMPT, params, n_head, 5, top_k=5, min_p=0.1)
    assert record[0].message.arguments == ("top_k", "min_p")
    assert ids == gpt2.generate(PROMPT, params, n_head, 5)


def test_seed_minus_one_samples_from_a_fresh_seed(tiny):
    _, params, n_head = tiny
    assert len(gpt2.generate(PROMPT, params, n_head, 5, temperature=1.0, seed=-1, stop_at_endoftext=False)) == 5


def test_a_repetition_penalty_far_below_1_still_samples(tiny):
    # seen tokens' positive logits divided by 1e-40 leave float32's range
    _, params, n_head = tiny
    ids = gpt2.generate(PROMPT, params, n_head, 5, temperature=1.0, repetition_penalty=1e-40, seed=1,
                        stop_at_endoftext=False)
    assert len(ids) == 5


def test_logits_at_an_infinite_extreme_share_all_the_probability():
    rng = np.random.default_rng(0)
    at_infinity = np.array([1, np.inf, -2, np.inf], dtype=np.float32)
    assert {gpt2.choose(at_infinity, rng, temperature=1.0) for _ in range(50)} == {1, 3}
    all_minus_infinity = np.full(4, -np.inf, dtype=np.float32)
    assert {gpt2.choose(all_minus_infinity, rng, temperature=1.0) for _ in range(50)} == {0, 1, 2, 3}


def test_ids_outside_the_vocabulary_or_not_in_a_list_are_an_error_naming_the_argument(tiny):
    _, params, n_head = tiny
    n_vocab = len(params["wte"])
    outside = f"token ids, whole numbers from 0 to {n_vocab - 1}"
    for run, argument, message in (
            (lambda: gpt2.generate([*PROMPT, -1], params, n_head, 2), "inputs", f"{outside}, got -1"),
            (lambda: gpt2.generate_batch([PROMPT, [n_vocab]], params, n_head, 2), "prompts", f"{outside}, got {n_vocab}"),
            (lambda: gpt2.score([*PROMPT, n_vocab], params, n_head), "ids", f"{outside}, got {n_vocab}"),
            (lambda: gpt2.generate("Hello", params, n_head, 2), "inputs", "a list of token ids, got 'Hello'"),
            (lambda: gpt2.generate(None, params, n_head, 2), "inputs", "a list of token ids, got None"),
            (lambda: gpt2.generate_batch(PROMPT, params, n_head, 2), "prompts",
             f"a list of lists of token ids, got {PROMPT[0]}")):
        with pytest.raises(GPT2Error, match=rf"^{argument} must be {message}$") as error:
            run()
        assert error.value.arguments == (argument,)


@pytest.mark.parametrize("value", [np.nan, np.inf])
# an infinite weight makes inf - inf inside a product, which NumPy warns of before our error (the command line
# silences NumPy: cli.py)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_damaged_weights_are_an_error_not_a_token(value, loaded_model):
    _, hparams, params = loaded_model("tiny")
    damaged = dict(params, ln_f=dict(params["ln_f"], g=np.full_like(params["ln_f"]["g"], value)))
    n_head = hparams["n_head"]
    for run in (lambda: gpt2.generate(PROMPT, damaged, n_head, 3),
                lambda: gpt2.generate(PROMPT, damaged, n_head, 3, temperature=1.0),
                lambda: gpt2.generate_batch([PROMPT, PROMPT[:2]], damaged, n_head, 3),
                lambda: gpt2.score(PROMPT, damaged, n_head)):
        with pytest.raises(GPT2Error, match="the model produced NaN: its weights are damaged"):
            run()


def test_each_tokens_log_probability_equals_hugging_faces(loaded_model, hf_model):
    _, hparams, params = loaded_model("tiny")
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 50256, hparams["n_ctx"])]
    with torch.no_grad():
        logits = hf_model("tiny")(torch.tensor([ids])).logits[0, :-1].double()
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), ids[1:]].numpy()
    assert np.abs(gpt2.score(ids, params, hparams["n_head"]) - expected).max() <= 1e-4


def test_scoring_in_windows_gives_each_token_the_log_probability_of_its_own_window(loaded_model):
    # the second window's tokens, scored by the model on that window alone: the vocabulary projection of only the
    # positions a window scores must not shift which position scores which token
    _, hparams, params = loaded_model("tiny")
    n_ctx, n_head = hparams["n_ctx"], hparams["n_head"]
    ids = [int(i) for i in np.random.default_rng(2).integers(0, 50256, n_ctx + n_ctx // 2)]
    window = ids[n_ctx // 2 :]
    alone = gpt2.score(window, params, n_head)
    np.testing.assert_allclose(gpt2.score(ids, params, n_head)[n_ctx - 1 :], alone[n_ctx // 2 - 1 :], atol=1e-6)


# Where a careless cut would change the ids (whitespace runs, contractions, CJK, emoji joined by zero-width joiners,
# combining marks), Windows and old Mac line ends, and characters of 2, 3 and 4 bytes for a read to split
CHUNKED_TEXT = ("It's what they'll do,   we've seen:\r\n\r\n\t 我能吞下玻璃而不伤身体。 Family 👨‍👩‍👧‍👦 cafe\u0301 3.14159\r"
                "x's  y'all — rock'n'roll 😀😀😀 \n") * 4


@pytest.mark.parametrize("read_bytes", [1, 3, 7])
def test_scoring_a_file_as_it_is_read_gives_the_log_probabilities_of_scoring_the_whole_text(loaded_model, tmp_path,
                                                                                            read_bytes):
    encoder, hparams, params = loaded_model("tiny")
    (tmp_path / "text.txt").write_bytes(CHUNKED_TEXT.encode("utf-8"))
    whole_text = (tmp_path / "text.txt").read_text(encoding="utf-8")  # with \r\n and \r read as \n, as gpt2.py does
    ids = encoder.encode(whole_text)
    assert len(ids) > 5 * hparams["n_ctx"]  # many windows, and a read size that cuts the text everywhere
    with open(tmp_path / "text.txt", "rb") as file:
        windows = list(gpt2.score_text(file, "text.txt", encoder, params, hparams["n_head"], read_bytes=read_bytes))
    assert np.concatenate([window_ids for window_ids, _ in windows]).tolist() == ids[1:]
    np.testing.assert_array_equal(np.concatenate([logprobs for _, logprobs in windows]),
                                  gpt2.score(ids, params, hparams["n_head"]))


def test_escape_controls_shows_exactly_the_control_characters_but_newline_and_tab_as_python_escapes():
    # Unicode's own category Cc is the control characters: C0, DEL and C1
    text = "".join(map(chr, range(0x3000)))
    controls = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"}
    assert gpt2.escape_controls(text) == "".join(f"\\x{ord(c):02x}" if c in controls else c for c in text)
    assert all(ast.literal_eval(f'"{gpt2.escape_controls(c)}"') == c for c in controls)  # each escape reads back
    assert gpt2.escape_controls("\x1b[2J\x9b\x7f") == r"\x1b[2J\x9b\x7f"
