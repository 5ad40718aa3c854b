"""Property tests (hypothesis) over what users type into the nodes and the command line, and what files carry.

The nodes' checks live in ``erasure/validation.py`` (the node module imports ComfyUI), so they run here: for any
input, a check either returns a clean value with the stated invariants or raises ``ValueError`` with a message;
never another exception. The command line is driven end to end up to the point where it would load a model.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erasure import validation
from erasure.ant import AntSettings

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: text users type: words, separators, whitespace of every kind, control characters, non-Latin scripts
TEXT = st.lists(st.sampled_from(list("ab cC;\n\t\r\x00\u200b\u3000\u732b\u00e9/.\\-_") + ["cat", "Cat", " dog "]),
               max_size=20).map("".join)
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10))


@FUZZ
@given(TEXT, st.one_of(st.none(), TEXT))
def test_node_concepts_are_clean_or_refused(concepts, anchors):
    try:
        names, anchor_list = validation.node_concepts(concepts, anchors)
    except ValueError as e:
        assert str(e)
        return
    assert names and all(n == " ".join(n.split()) and n for n in names)
    assert len({n.lower() for n in names}) == len(names)
    assert len(anchor_list) in (0, 1, len(names))
    for i, n in enumerate(names):
        if anchor_list:
            assert anchor_list[min(i, len(anchor_list) - 1)].lower() != n.lower()


@FUZZ
@given(TEXT)
def test_ant_concept_is_clean_or_refused(concept):
    try:
        out = validation.check_concept(concept)
    except ValueError as e:
        assert "empty" in str(e) or "characters long" in str(e)
        assert not concept.strip() or len(concept.strip()) > validation.MAX_TEXT
        return
    assert out and out == " ".join(concept.split())


@FUZZ
@given(st.text(max_size=300))
def test_file_names_never_leave_the_folder(name):
    folder = Path(tempfile.gettempdir()) / "erasure-fuzz"
    try:
        out = validation.safe_filename(name)
    except ValueError as e:
        assert "the file name is empty" in str(e)
        return
    assert out.endswith(".safetensors") and len(out) <= validation.MAX_FILENAME
    assert "/" not in out and "\\" not in out and not out.startswith(".") and out != ".safetensors"
    assert out.split(".")[0].strip().lower() not in validation._WINDOWS_RESERVED
    assert validation.path_inside(folder, name).parent == folder.resolve()


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=30)),
                       lambda inner: st.one_of(st.lists(inner, max_size=8),
                                               st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                       max_leaves=20)


@FUZZ
@given(st.one_of(JSONISH.map(json.dumps), st.text(max_size=60)))
def test_metadata_concepts_are_always_clean_text(raw):
    got = validation.concepts_from_metadata({"erasure.concepts": raw})
    assert isinstance(got, list) and len(got) <= validation.MAX_METADATA_CONCEPTS
    for c in got:
        assert isinstance(c, str) and c and c == validation.clean_text(c)
        assert not any(ord(ch) < 32 for ch in c)


@FUZZ
@given(NUMBER, st.integers(-3, 5), NUMBER, st.one_of(st.none(), st.integers(-16, 80)))
def test_ant_settings_are_valid_or_refused(lr, steps, fraction, resolution):
    s = AntSettings(lr=lr, steps=steps, saliency_fraction=fraction, resolution=resolution)
    try:
        s.validate()
        validation.check_learning_rate(s.lr)
        validation.check_resolution(s.resolution)
    except ValueError as e:
        assert str(e)
        return
    assert math.isfinite(lr) and 0 < lr <= 1 and steps >= 1 and 0 < fraction <= 1
    assert resolution in (None, 0) or (resolution > 0 and resolution % 8 == 0)


class Reached(Exception):
    """The command line got as far as loading a model: every check before it passed."""


def _run_cli(argv: list[str]) -> tuple[str, str]:
    """(outcome, stderr): outcome is 'reached', 'refused' (exit status 2 with a message) or 'usage'."""
    from erasure import cli

    err = io.StringIO()
    with mock.patch.object(cli, "_load_model", side_effect=Reached), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except Reached:
            return "reached", err.getvalue()
        except SystemExit as e:  # argparse (code 2) or our own "error: ..." exits
            if isinstance(e.code, str):
                assert e.code.startswith("error: "), e.code
                return "refused", e.code
            assert e.code == 2, e.code
            return "usage", err.getvalue()
    assert rc == 2 and err.getvalue().startswith("error: "), (rc, err.getvalue())
    return "refused", err.getvalue()


OUT = st.sampled_from(["erased.safetensors", "erased.pt", "x", "sub/dir/erased.safetensors", ""])


@FUZZ
@given(TEXT, NUMBER, st.integers(-2, 3), NUMBER, OUT, st.integers(-16, 72))
def test_ant_command_line_refuses_bad_input_before_loading_a_model(concept, lr, steps, fraction, out, resolution):
    with tempfile.TemporaryDirectory() as d:
        target = str(Path(d) / out) if out else ""
        outcome, msg = _run_cli(["ant", f"--concept={concept}", f"--lr={lr}", f"--steps={steps}",
                                 f"--saliency-fraction={fraction}", f"--out={target}",
                                 f"--resolution={resolution}"])
        assert not any(Path(d).iterdir()), "something was written"
    if outcome == "reached":
        names = [c.strip() for c in concept.split(";") if c.strip()]
        assert names and len({" ".join(c.split()).lower() for c in names}) == len(names)
        assert 0 < lr <= 1 and steps >= 1 and 0 < fraction <= 1 and out.endswith(".safetensors")
        assert resolution == 0 or resolution % 8 == 0 and resolution > 0
    else:
        assert msg.strip()


@FUZZ
@given(TEXT, st.one_of(st.none(), TEXT), NUMBER, st.integers(-2, 3))
def test_mace_command_line_refuses_bad_input_before_loading_a_model(concepts, anchors, lr, steps):
    with tempfile.TemporaryDirectory() as d:
        argv = ["mace", f"--concepts={concepts}", f"--lr={lr}", f"--steps={steps}", f"--out={d}/m.safetensors"]
        outcome, msg = _run_cli(argv + ([f"--anchors={anchors}"] if anchors is not None else []))
        assert not any(Path(d).iterdir()), "something was written"
    if outcome == "reached":
        assert 0 < lr <= 1 and steps >= 1
        names = [c.strip() for c in concepts.split(";") if c.strip()]
        assert len({" ".join(c.split()).lower() for c in names}) == len(names)
    else:
        assert msg.strip()


def test_valid_command_lines_reach_the_model_and_bad_ones_say_why():
    """The properties above would hold vacuously if nothing ever got through: anchor them with known cases."""
    ok = ["--lr=0.0001", "--steps=2", "--out=erased.safetensors"]
    assert _run_cli(["ant", "--concept=cat", *ok])[0] == "reached"
    assert _run_cli(["mace", "--concepts=cat; dog", "--anchors=animal", *ok])[0] == "reached"
    for argv, why in [(["ant", "--concept=cat; Cat", *ok], "duplicate concepts: cat"),
                      (["ant", "--concept=cat", "--lr=0", "--out=e.safetensors"], "positive number"),
                      (["ant", "--concept=cat", "--out=erased.ckpt"], "must end in .safetensors"),
                      (["ant", "--concept= ; ", *ok], "no concept given"),
                      (["mace", "--concepts=cat", "--anchors=Cat", *ok], "is the concept itself"),
                      (["mace", "--concepts=cat", "--steps=0", "--out=e.safetensors"], "lora_steps must be")]:
        outcome, msg = _run_cli(argv)
        assert outcome == "refused" and why in msg, (argv, outcome, msg)


@pytest.mark.parametrize("strength, outcome", [(0.0, "refused"), (-1.0, "refused"), (float("nan"), "refused"),
                                               (1.25, "reached")])
def test_ant_fuse_strength_is_checked_before_loading_a_model(strength, outcome, tmp_path):
    got, msg = _run_cli(["ant", "--concepts=circle; square", f"--fuse-strength={strength}",
                         f"--out={tmp_path / 'x.safetensors'}"])
    assert got == outcome, msg
    assert outcome == "reached" or "fusion strength" in msg
