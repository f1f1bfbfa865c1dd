"""bench.py refuses the flags no benchmark could use with one line, before it builds or runs anything."""
import pytest

from conftest import assert_clean_error, run_script


@pytest.mark.parametrize("args, words", [
    (["--n_new", "0"], ["--n_new", "from 1 to 1014"]),
    (["--n_new", "-3"], ["--n_new"]),
    (["--n_new", "2000"], ["--n_new"]),
    (["--threads", "0"], ["--threads"]),
    (["--train", "--runs", "0"], ["--runs"]),
    (["--model_size", "7B"], ["--model_size", "1558M"]),
    (["--model_size", "124M", "--model_dir", "."], ["--model_size", "--model_dir"]),
    (["--model_dir", "/nonexistent"], ["/nonexistent", "does not exist"]),
])
def test_a_flag_no_benchmark_could_use_is_one_line_before_anything_is_built(args, words, tmp_path):
    result = run_script("bench.py", *args, "--models_dir", tmp_path / "built")
    assert_clean_error(result, *words)
    assert not (tmp_path / "built").exists()


def test_a_model_too_small_for_the_benchmarks_prompts_is_refused(fixture_model, tmp_path):
    model_dir, hparams, _ = fixture_model("tiny")
    result = run_script("bench.py", "--model_dir", model_dir, "--models_dir", tmp_path / "built")
    assert_clean_error(result, "--model_dir", f"context of {hparams['n_ctx']}")
    assert not (tmp_path / "built").exists()


def test_flags_that_train_does_not_use_say_so():
    import bench
    from errors import GPT2Warning

    with pytest.warns(GPT2Warning, match=r"^models_dir and n_new have no effect with train, which times") as record:
        bench.check_flags(None, None, "elsewhere", 64, 2, True, 1)
    assert tuple(record[0].message.arguments) == ("models_dir", "n_new", "train")
