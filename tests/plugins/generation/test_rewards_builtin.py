"""The generation plugin's built-in reward functions, on hand-picked strings, found by name like any plugin's."""

from __future__ import annotations

import pytest

from finetune import reward_functions
from finetune_generation.rewards import final_number


def _ex(reference, **options):
    return {"prompt": "p", "reference": reference, "_options": options}


def test_the_builtins_are_registered_by_name_through_the_hook():
    known = reward_functions()
    for name in ("exact-number", "exact-match", "format", "length-penalty"):
        assert name in known and known[name].plugin.startswith("plugin 'generation'"), known.get(name)
        assert known[name].description


@pytest.mark.parametrize(("text", "number"), [
    ("42 - 75 = -33", -33), ("0.1 cm = 1 mm", 1), ("16.5 h = 990 min", 990), ("the answer is 7", 7),
    ("3 + 4 = 7, so 7 = 7.0", 7), ("no number", None), ("x = 12.50 kg", 12.5),
])
def test_final_number_is_the_number_after_the_last_equals_sign_else_the_last_number(text, number):
    assert final_number(text) == number


def test_exact_number_compares_final_numbers_and_matches_the_benchmark_rule():
    import importlib.util
    from pathlib import Path

    reward = reward_functions()["exact-number"]
    ref = "42 - 75 = -33"
    texts = ["42 - 75 = -33", "42 - 75 = 33", "42-75=-33.0", "It is -33", "42 - 75 = 1", "", "= -33 mm"]
    got = reward(texts, [_ex(ref)] * len(texts))
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    bench = Path(__file__).resolve().parents[3] / "benchmarks" / "arithmetic_correctness.py"
    spec = importlib.util.spec_from_file_location("bench", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert got == [float(module.score(t, ref)[0]) for t in texts]  # the benchmark's "correct"


def test_the_benchmarks_paired_comparison_counts_discordant_prompts_with_the_exact_sign_test():
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[3] / "benchmarks" / "arithmetic_correctness.py"
    spec = importlib.util.spec_from_file_location("bench", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = {"correct_each": [True, False, False, True, False, True]}
    other = {"correct_each": [True, True, True, False, False, True]}
    assert module.paired(first, other) == {"gained": 2, "lost": 1, "p_value": 1.0}
    assert module.sign_test(12, 2) == pytest.approx(2 * (1 + 14 + 91) / 2 ** 14)  # binomial(14, 1/2) tails
    assert module.sign_test(2, 12) == module.sign_test(12, 2) and module.sign_test(0, 0) == 1.0
    assert module.sign_test(6, 0) == pytest.approx(2 / 64)


def test_exact_match_compares_what_the_regex_extracts():
    reward = reward_functions()["exact-match"]
    default = reward(["2 + 2 = 4", "2+2 =  4 ", "2 + 2 = 4.0", "four"], [_ex("2 + 2 = 4")] * 4)
    assert default == [1.0, 1.0, 0.0, 0.0]  # "= (.+)": the text after the last "=", as a string
    tagged = [_ex("<answer>Paris</answer>", answer_regex=r"<answer>(.*?)</answer>")] * 3
    assert reward(["I think <answer>Paris</answer>", "<answer>paris</answer>", "Paris"], tagged) == [1.0, 0.0, 0.0]


def test_format_needs_the_whole_completion_to_match():
    reward = reward_functions()["format"]
    texts = ["42 - 75 = -33", "16.5 h = 990 min", "The answer: 42 - 75 = -33 I think so", "-33"]
    assert reward(texts, [_ex(None)] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert reward(["<a>1</a>", "x <a>1</a>"], [_ex(None, format_regex=r"<a>\d+</a>")] * 2) == [1.0, 0.0]


def test_length_penalty_grows_with_the_length_over_the_target():
    reward = reward_functions()["length-penalty"]
    assert reward(["x" * 10, "x" * 15, "x" * 30], [_ex(None, length_target=10)] * 3) == [0.0, -0.5, -2.0]
    words = [_ex(None, length_target=2, length_unit="words")] * 2
    assert reward(["one two", "one two three four"], words) == [0.0, -1.0]


def test_a_reward_that_needs_a_reference_names_itself_when_a_row_has_none():
    from finetune import PluginError

    with pytest.raises(PluginError, match="reward function 'exact-number' .*no.*reference"):
        reward_functions()["exact-number"](["1"], [_ex(None)])
