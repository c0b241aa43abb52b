"""``python -m bench detok`` measures vLLM's own detokenizer on the model's control tokens."""

from __future__ import annotations

from bench import detok


def test_each_prompt_length_is_measured_on_vllms_fast_detokenizer(demo_model_dir):
    report = detok.measure(demo_model_dir, prompt_tokens=[20, 200], steps=4, repeats=1)
    # The explanation in the README is about this class's DecodeStream, primed with the prompt.
    assert report["fast_path"] and report["detokenizer"] == "FastIncrementalDetokenizer"
    assert report["control_token"] == "[respond]"
    assert [r["prompt_tokens"] for r in report["rows"]] == [20, 200]
    for row in report["rows"]:
        assert row["control_ms"] > 0 and row["ordinary_ms"] > 0
        assert abs(row["difference_ms"] - (row["control_ms"] - row["ordinary_ms"])) < 1e-9
    assert detok.markdown(report).count("\n| ") == 3  # header + one row per prompt length


def test_the_control_token_adds_no_text_and_the_ordinary_one_does(demo_model_dir):
    """What makes the two cases differ: a skipped special token leaves the stream's buffer whole."""
    from vllm.tokenizers import get_tokenizer

    from bench.work import manifest

    tokenizer = get_tokenizer(str(demo_model_dir))
    control = next(t["id"] for t in manifest(str(demo_model_dir))["tokens"] if t["key"] == "respond")
    ordinary = tokenizer.encode(" the", add_special_tokens=False)[0]
    prompt = tokenizer.encode(detok.FILLER, add_special_tokens=False)
    special, text = detok._detokenizer(tokenizer, prompt), detok._detokenizer(tokenizer, prompt)
    special.update([control, control], False)
    text.update([ordinary, ordinary], False)
    assert special.output_text == "" and text.output_text.strip() == "the the"
