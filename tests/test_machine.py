"""machine.py: every form of a product equals NumPy's own, every layout and form gives the model's same logits, and
the choices are measured once per machine and remembered."""
import json
import os
import time

import numpy as np
import pytest
import torch

import gpt2
import machine
from conftest import PINNED_CHOICES
from fast_layout import FAST_LAYOUT_FILE
from utils import load_encoder_hparams_and_params

SHAPES = [(64, 192), (192, 64), (64, 257)]  # [n_in, n_out]: blocks that divide n_out, one that is all of it, a vocabulary


@pytest.mark.parametrize("form", machine.ROWS_FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [2, 5, 33])
def test_every_form_of_a_few_rows_times_transposed_weights_is_numpys_product(form, shape, m):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape[::-1], np.float32).T  # stored [n_out, n_in], as the fast layout holds it
    x = rng.standard_normal((m, shape[0]), np.float32)
    y = machine.ROWS_FORMS[form](x, w)
    assert y.shape == (m, shape[1])
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("most_rows", [2 * machine.TIMED_ROWS, machine.MANY_ROWS])
def test_the_chosen_form_serves_from_two_rows_up_to_the_most_rows_measured(most_rows, monkeypatch):
    used = []
    monkeypatch.setitem(machine.ROWS_FORMS, "recording", lambda x, w: used.append(len(x)) or x @ w)
    monkeypatch.setattr(machine, "_choices", dict(PINNED_CHOICES, rows_form="recording", most_rows=most_rows))
    stored = np.ones((3, 4), np.float32)  # [n_out, n_in], as the fast layout holds a weight
    for m in (1, 2, most_rows, most_rows + 1):
        machine.rows_times(np.ones((m, 4), np.float32), stored.T)
    machine.rows_times(np.ones((2, 4), np.float32), np.ones((4, 3), np.float32))  # the checkpoint's layout
    assert used == [2, most_rows]


def test_the_matrices_of_a_wider_gpt2_and_the_vocabulary_get_the_forms_measured_for_them(monkeypatch):
    used = []
    for form in ("base", "wide", "vocabulary"):
        monkeypatch.setitem(machine.ROWS_FORMS, form, lambda x, w, form=form: used.append(form) or x @ w)
    wider_forms = dict(PINNED_CHOICES["wider_forms"], **{str(machine.WIDER[-1]): "wide"})
    monkeypatch.setattr(machine, "_choices", dict(PINNED_CHOICES, rows_form="base", wider_forms=wider_forms,
                                                  vocabulary_form="vocabulary"))
    x = np.ones((2, machine.WIDER[-1]), np.float32)
    for n_out in (machine.WIDER[-1], 4 * machine.WIDER[-1]):  # attention's c_proj, then c_fc: [n_in, n_out]
        y = machine.rows_times(x, np.ones((n_out, machine.WIDER[-1]), np.float32).T)
        assert y.shape == (2, n_out)
    machine.rows_times(np.ones((2, 768), np.float32), np.ones((3072, 768), np.float32).T)  # 124M's c_fc
    machine.vocabulary_times(x, np.ones((10, machine.WIDER[-1]), np.float32))
    assert used == ["wide", "wide", "base", "vocabulary"]


@pytest.fixture
def choose(monkeypatch):  # choose(layout, rows_form): this process's choices, as if measured so
    def set_choices(layout, rows_form):  # the vocabulary's product in the same form
        monkeypatch.setattr(machine, "_choices", dict(PINNED_CHOICES, layout=layout, rows_form=rows_form,
                                                      vocabulary_form=rows_form))

    return set_choices


@pytest.mark.parametrize("layout", [machine.CHECKPOINT, machine.TRANSPOSED])
@pytest.mark.parametrize("form", machine.ROWS_FORMS)
def test_every_layout_and_form_gives_transformers_logits_and_the_same_generation(layout, form, choose, fixture_model,
                                                                                  hf_model):
    model_dir, hparams, _ = fixture_model("h12")
    choose(layout, form)
    _, _, params = load_encoder_hparams_and_params(model_dir=model_dir)
    assert params["blocks"][0]["mlp"]["c_fc"]["w"].flags.f_contiguous == (layout == machine.TRANSPOSED)
    ids = list(np.random.default_rng(0).integers(0, hparams["n_vocab"], 40))
    with torch.no_grad():
        expected = hf_model("h12")(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(gpt2.gpt2(ids, **params, n_head=hparams["n_head"]), expected, atol=1e-4)
    prompts = [ids[:5], ids[:9], ids[:7]]
    batch = gpt2.generate_batch(prompts, params, hparams["n_head"], 6, stop_at_endoftext=False)
    assert batch == [gpt2.generate(p, params, hparams["n_head"], 6, stop_at_endoftext=False) for p in prompts]


def test_the_checkpoint_layout_writes_no_copy_and_the_transposed_one_does(choose, fixture_model, tmp_path):
    model_dir, _, _ = fixture_model("tiny")
    for layout, written in ((machine.CHECKPOINT, False), (machine.TRANSPOSED, True)):
        folder = tmp_path / layout
        os.makedirs(folder)
        for path in model_dir.iterdir():
            if path.is_file() and not path.name.startswith((".", FAST_LAYOUT_FILE)):
                os.link(path, folder / path.name)
        choose(layout, "plain")
        load_encoder_hparams_and_params(model_dir=folder)
        assert (folder / FAST_LAYOUT_FILE).exists() == written


def test_the_first_use_measures_this_machine_and_later_ones_remember_it(fresh_cache, monkeypatch):
    chosen = machine.choices()
    assert machine.valid(chosen) and chosen["machine"] == machine.machine_key()
    assert len(chosen["measured_ms"]) == 15 + 4 * len(machine.WIDER)
    assert all(ms > 0 for ms in chosen["measured_ms"].values())
    assert json.loads(fresh_cache.read_text()) == chosen
    monkeypatch.setattr(machine, "_choices", None)
    monkeypatch.setattr(machine, "measure", lambda: pytest.fail("measured again"))
    assert machine.choices() == chosen


@pytest.mark.parametrize("cached", [
    "not json",
    json.dumps({"layout": "sideways", "rows_form": "plain", "most_rows": machine.MANY_ROWS}),
    json.dumps({"layout": machine.TRANSPOSED, "rows_form": "blocks"}),  # from before most_rows was measured
    json.dumps({"layout": machine.TRANSPOSED, "rows_form": "blocks", "most_rows": machine.MANY_ROWS,
                "machine": machine.machine_key()}),  # from before the vocabulary's form was measured
    json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key(), wider_forms={"1600": "blocks"})),  # some sizes
    json.dumps(dict(PINNED_CHOICES, machine="another CPU; 2 cores; NumPy 1.0; OpenBLAS 0.1")),
    json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key().replace(  # before the forms' way of running changed
        f"forms {machine.FORMS_VERSION}", f"forms {machine.FORMS_VERSION - 1}"))),
    json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key(), fastest={"a task": ["parts"]})),
])
def test_a_cache_that_is_damaged_or_of_another_machine_is_measured_again(cached, fresh_cache, monkeypatch):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(cached)
    measured = {"layout": machine.CHECKPOINT, "rows_form": "transposed", "most_rows": 2 * machine.TIMED_ROWS}
    monkeypatch.setattr(machine, "measure", lambda: measured)
    assert machine.choices() == dict(measured, machine=machine.machine_key())
    assert json.loads(fresh_cache.read_text())["machine"] == machine.machine_key()


def test_choices_made_with_other_openblas_kernels_are_measured_again(fresh_cache, monkeypatch):
    # OPENBLAS_CORETYPE picks OpenBLAS's kernels when it loads: on an AMD EPYC with AVX-512 its Haswell kernels and
    # its own pick (SkylakeX) ranked the forms differently, on the same CPU and NumPy
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key())))
    monkeypatch.setattr(machine, "openblas_kernels", lambda: "other")
    monkeypatch.setattr(machine, "measure", lambda: dict(PINNED_CHOICES, rows_form="transposed"))
    assert machine.choices()["rows_form"] == "transposed" and "(other kernels)" in machine.machine_key()
    assert json.loads(fresh_cache.read_text())["machine"] == machine.machine_key()


def test_cpus_that_share_a_name_but_not_a_model_are_told_apart(tmp_path):
    # a virtual machine named two Xeons, which ranked the forms differently, alike
    def name_of(model):
        cpuinfo = tmp_path / f"cpuinfo-{model}"
        cpuinfo.write_text("".join(f"processor\t: {n}\ncpu family\t: 6\nmodel\t\t: {model}\n"
                                   f"model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f\n\n"
                                   for n in range(2)))
        return machine.cpu_name(cpuinfo)

    assert name_of(167) == "Intel(R) Xeon(R) Processor (cpu family 6, model 167)"
    assert name_of(207) != name_of(167)


def test_a_cache_that_cannot_be_written_still_gives_this_process_its_choices(fresh_cache, monkeypatch):
    fresh_cache.parent.parent.mkdir()
    fresh_cache.parent.write_text("a file where the folder would go")
    monkeypatch.setattr(machine, "measure", lambda: dict(PINNED_CHOICES))
    assert machine.choices()["rows_form"] == "blocks"


def test_fastest_runs_each_way_in_turn_once_per_task_and_remembers_the_fastest(pinned_cache, monkeypatch):
    runs = []
    ways = {"slow": lambda: runs.append("slow") or time.sleep(0.02), "quick": lambda: runs.append("quick")}
    assert machine.fastest("a task at one shape", ways) == "quick"
    assert runs == ["slow", "quick"] * machine.N_TRIALS
    assert json.loads(pinned_cache.read_text())["fastest"] == {"a task at one shape": "quick"}
    monkeypatch.setattr(machine, "_choices", None)  # as in a new process
    assert machine.fastest("a task at one shape", ways) == "quick" and len(runs) == 2 * machine.N_TRIALS
    assert machine.fastest("a task at another shape", ways) == "quick" and len(runs) == 4 * machine.N_TRIALS


def test_fastest_takes_a_way_another_process_measured_after_this_one_read_the_cache(pinned_cache):
    machine.choices()
    pinned_cache.write_text(json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key(), fastest={"a task": "b"})))
    unmeasured = {"a": lambda: pytest.fail("measured again"), "b": lambda: pytest.fail("measured again")}
    assert machine.fastest("a task", unmeasured) == "b"
