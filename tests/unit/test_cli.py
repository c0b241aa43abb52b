"""``refusal-gateway``: the kit's commands are handed over whole; ``build-model`` builds by name."""

from __future__ import annotations

import pytest
from refusal_gateway import cli
from refusal_plugins.vocab import MANIFEST_FILE


@pytest.mark.parametrize(
    "words", [["score"], ["eval"], ["calibrate"], ["train"], ["recipe", "smollm2"]]
)
def test_kit_commands_own_their_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: refusal-gateway {' '.join(words)} ")


def test_kit_arguments_reach_the_kit_untouched(monkeypatch):
    import refusal_training.evaluate as ev

    seen = []
    monkeypatch.setattr(ev, "main", lambda argv: seen.append(argv) or 0)
    argv = ["x.jsonl", "--bias-sweep", "-2:2:2", "--", "--url", "u"]
    assert cli.main(["eval", *argv]) == 0
    assert seen == [argv]


def test_the_listing_names_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("serve", "build-model", "build-demo", "score", "eval", "calibrate", "train", "recipe"):
        assert name in out


@pytest.mark.parametrize("force", [False, True])
def test_build_model_builds_by_name(tmp_path, monkeypatch, capsys, force):
    import refusal_training.build as build

    built = []

    def builder(cache_dir, force, artefact):
        assert artefact is None
        path = cache_dir / "m"
        if force or not (path / MANIFEST_FILE).is_file():
            path.mkdir(parents=True, exist_ok=True)
            (path / MANIFEST_FILE).write_text("{}")
            built.append(path)
        return path

    monkeypatch.setitem(build.BUILDERS, "fake", builder)
    builder(tmp_path, False, None)  # cached already
    argv = ["build-model", "fake", "--cache-dir", str(tmp_path)]
    assert cli.main(argv + (["--force"] if force else [])) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert len(built) == (2 if force else 1)
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["build-model", "nope", "--cache-dir", str(tmp_path)])


def test_build_model_assembles_a_given_head_artefact(tmp_path, monkeypatch, capsys):
    """``build-model smollm2 --artefact``: a head_recipe run's head (e.g. one fitted
    ``--hold-out`` a source, to measure that source through a server) instead of the
    committed one; the demo model is trained, so it takes none."""
    import refusal_training.build as build

    seen = []
    monkeypatch.setitem(build.BUILDERS, "smollm2",
                        lambda cache_dir, force, artefact: seen.append(artefact) or tmp_path / "m")  # fmt: skip
    artefact = tmp_path / "run" / "smollm2_refusal.safetensors"
    with pytest.raises(SystemExit, match="no head artefact at"):
        cli.main(["build-model", "smollm2", "--artefact", str(artefact), "--cache-dir", str(tmp_path)])
    artefact.parent.mkdir()
    artefact.write_bytes(b"x")
    assert cli.main(["build-model", "smollm2", "--artefact", str(artefact), "--cache-dir", str(tmp_path)]) == 0
    assert seen == [artefact] and capsys.readouterr().out.strip() == str(tmp_path / "m")
    with pytest.raises(SystemExit, match="trained, not assembled"):
        cli.main(["build-model", "demo", "--artefact", str(artefact), "--cache-dir", str(tmp_path)])
