"""``RefusalManifest.build``: the one builder of manifests from token texts and ids."""

from __future__ import annotations

import pytest
from refusal_plugins.vocab import COCONOT_CATEGORIES, RefusalManifest, default_token_text


def test_build_binary_orders_respond_first_whatever_the_mapping_order():
    texts = {"refuse": "<no>", "respond": "<yes>"}
    ids = {"refuse": 7, "respond": 3}
    manifest = RefusalManifest.build("binary", texts, ids, extra={"base_model": "/m"})
    assert [t.key for t in manifest.tokens] == ["respond", "refuse"]
    assert manifest.respond.text == "<yes>" and manifest.ids == [3, 7]
    assert [t.category for t in manifest.tokens] == [None, None]
    assert manifest.to_json() == {
        "version": 1,
        "scheme": "binary",
        "tokens": [
            {"key": "respond", "text": "<yes>", "id": 3, "category": None},
            {"key": "refuse", "text": "<no>", "id": 7, "category": None},
        ],
        "base_model": "/m",
    }


def test_build_categorical_names_the_categories():
    keys = ["safety", "respond", "unsupported", "humanizing", "indeterminate", "incomplete"]
    texts = {key: default_token_text(key) for key in keys}
    ids = {key: 100 + i for i, key in enumerate(keys)}
    manifest = RefusalManifest.build("categorical", texts, ids)
    order = ["respond", "humanizing", "incomplete", "indeterminate", "safety", "unsupported"]
    assert [t.key for t in manifest.tokens] == order
    assert [t.id for t in manifest.tokens] == [ids[key] for key in order]
    assert [t.text for t in manifest.tokens] == [texts[key] for key in order]
    assert manifest.respond.category is None
    assert [t.category for t in manifest.refusal_tokens] == [
        COCONOT_CATEGORIES[key] for key in order[1:]
    ]
    assert manifest.extra == {}
    assert RefusalManifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    "texts, ids",
    [
        ({"respond": "a"}, {"respond": 1, "refuse": 2}),  # a text missing
        ({"respond": "a", "refuse": "b"}, {"respond": 1}),  # an id missing
        ({"respond": "a", "refuse": "b", "safety": "c"}, {"respond": 1, "refuse": 2}),  # extra
        ({"respond": "a", "safety": "b"}, {"respond": 1, "safety": 2}),  # other scheme's key
    ],
)
def test_build_refuses_keys_that_do_not_match_the_scheme(texts, ids):
    with pytest.raises(ValueError, match="do not match scheme 'binary'"):
        RefusalManifest.build("binary", texts, ids)


def test_build_keeps_distinct_ids_checked():
    with pytest.raises(ValueError, match="distinct"):
        RefusalManifest.build(
            "binary", {"respond": "a", "refuse": "b"}, {"respond": 1, "refuse": 1}
        )


@pytest.mark.parametrize(
    "extra, dtype",
    [({"dtype": "float32"}, "float32"), ({}, None), ({"dtype": ""}, None), ({"dtype": 32}, None)],
)
def test_the_declared_dtype_is_a_string_or_nothing(extra, dtype):
    """The launcher passes it to vLLM's --dtype; anything but a name leaves vLLM's default."""
    texts = {"respond": "<yes>", "refuse": "<no>"}
    manifest = RefusalManifest.build("binary", texts, {"respond": 3, "refuse": 7}, extra=extra)
    assert RefusalManifest.from_json(manifest.to_json()).dtype == dtype
