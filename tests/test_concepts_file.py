"""Concepts files (issue 20, item 4): one concept per line, optional kind and anchor."""

from __future__ import annotations

import time

import pytest

from erasure.errors import BadInputError
from erasure.prompts import ConceptLine, parse_concepts, read_concepts_file


def test_lines_fields_comments_and_defaults():
    text = "# celebrities\n\nTom Hanks | person\n  Van Gogh | style | art  \nteapot\nkettle | | a cup\n# end\n"
    got = parse_concepts(text)
    assert got == [ConceptLine("Tom Hanks", "person", None, 3), ConceptLine("Van Gogh", "style", "art", 4),
                   ConceptLine("teapot", None, None, 5), ConceptLine("kettle", None, "a cup", 6)]
    c = got[0].concept("object", "background")
    assert (c.text, c.kind, c.anchor) == ("Tom Hanks", "person", "background")
    c = got[3].concept("object", "background")
    assert (c.kind, c.anchor) == ("object", "a cup")


@pytest.mark.parametrize(("text", "words"), [
    ("a\nb | object | x | y\n", ["line 2", "4 fields"]),
    ("a\n | person\n", ["line 2", "no concept"]),
    ("a | monster\n", ["line 1", "unknown kind 'monster'", "person"]),
    ("cat | object | Cat\n", ["line 1", "the concept itself"]),
    ("cat\ndog\nCat | person\n", ["line 3", "line 1", "remove one"]),
    ("# nothing\n\n", ["lists no concept"]),
])
def test_errors_name_the_line_and_the_fix(text, words):
    with pytest.raises(BadInputError) as e:
        parse_concepts(text, source="names.txt")
    for w in words:
        assert w in str(e.value)
    assert "names.txt" in str(e.value)


def test_a_thousand_lines_parse_instantly(tmp_path):
    path = tmp_path / "names.txt"
    kinds = ["person", "style", "object", ""]
    path.write_text("\n".join(f"name {i} | {kinds[i % 4]} | anchor {i}" for i in range(1000)), encoding="utf-8")
    t0 = time.perf_counter()
    got = read_concepts_file(path)
    assert time.perf_counter() - t0 < 0.5
    assert len(got) == 1000 and got[999].text == "name 999" and got[3].kind is None


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(BadInputError, match="no such concepts file"):
        read_concepts_file(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(BadInputError, match="UTF-8"):
        read_concepts_file(tmp_path / "bad.txt")


def test_cli_mace_reads_a_concepts_file_with_kinds_and_anchors(tiny_backbone, tmp_path, monkeypatch):
    """``python -m erasure mace --concepts-file``: each line's kind and anchor reach MACE, with the work directory;
    --concepts and --concepts-file together are refused."""
    from erasure import cli

    captured = {}

    def fake_mace(backbone, items, s, prior, work_dir=None, **kw):
        captured.update(items=items, work_dir=work_dir)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "mace", fake_mace)
    monkeypatch.setattr(cli, "_load_model", lambda args, need_vae=False: tiny_backbone)
    monkeypatch.setattr(cli, "check_mace_inputs", lambda *a, **k: None)  # the lab vocabulary has no 'kettle'
    monkeypatch.setattr(cli, "gram", lambda *a, **k: None)
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    f = tmp_path / "names.txt"
    f.write_text("# artists and things\nkettle\nvan gogh | style | art\nmickey mouse | | a cartoon\n")
    with pytest.raises(SystemExit):
        cli.main(["mace", "--model", "x.safetensors", "--concepts-file", str(f), "--work-dir", str(tmp_path / "w"),
                  "--out", str(tmp_path / "x.safetensors")])
    got = [(c.text, c.kind, c.anchor) for c in captured["items"]]
    assert got == [("kettle", "object", "ground"), ("van gogh", "style", "art"),  # the object preset's anchor
                   ("mickey mouse", "object", "a cartoon")]
    assert captured["work_dir"] == str(tmp_path / "w")
    with pytest.raises(SystemExit, match="one of them"):
        cli.main(["mace", "--concepts", "a", "--concepts-file", str(f), "--out", str(tmp_path / "y.safetensors")])
