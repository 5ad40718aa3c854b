"""The second lab model's recipe (issue 18, item 4): a CLIP-like text encoder trained contrastively, then a UNet
trained on it frozen."""

import json

import pytest
import torch
from safetensors.torch import load_file

from erasure.lab import world
from erasure.lab.clip_train import named_factors, positives, train_text_encoder
from erasure.lab.model import is_lab_model
from erasure.lab.train import train_lab_model


def test_a_caption_names_only_the_factors_its_words_say():
    got = named_factors(["a photo of a crimson disk", "a striped picture of a thing", "a shape in plaid style",
                         "a plain picture of a lemon x"])
    s, c, y = world.SHAPES.index, world.COLOURS.index, world.STYLES.index
    assert got.tolist() == [[s("circle"), c("red"), -1], [-1, -1, y("striped")], [-1, -1, y("checkered")],
                            [s("cross"), c("yellow"), y("plain")]]


def test_positives_are_the_images_that_agree_with_every_named_factor():
    attrs = world.Attributes(shape=torch.tensor([0, 0, 1]), colour=torch.tensor([0, 1, 0]),
                             style=torch.tensor([0, 0, 2]))
    named = torch.tensor([[0, -1, -1], [0, 1, -1], [-1, -1, -1]])
    assert positives(named, attrs).tolist() == [[True, True, False], [False, True, False], [True, True, True]]
    # a caption of a sampled batch is always a positive of its own image
    g = torch.Generator().manual_seed(0)
    _, caps, attrs = world.sample_batch(64, g, p_empty=0.0)
    assert positives(named_factors(caps), attrs).diagonal().all()


def test_text_encoder_training_then_a_unet_on_it_frozen(tmp_path):
    te_dir = tmp_path / "te"
    report = train_text_encoder(te_dir, steps=3, batch_size=8, log=lambda m: None)
    assert {"end_token_cosine", "last_padding_cosine", "zero_shot"} <= set(report)
    assert (te_dir / "tokenizer" / "vocab.json").exists() and (te_dir / "image_tower.safetensors").exists()
    recipe = json.loads((te_dir / "text-encoder-recipe.json").read_text())
    assert recipe["command"].startswith("python -m erasure lab train-text-encoder") and recipe["steps"] == 3

    out = tmp_path / "model"
    train_lab_model(out, steps=3, batch_size=4, save_every=10, text_encoder=te_dir, stop_after=2, log=lambda m: None)
    saved = load_file(str(out / "text_encoder" / "model.safetensors"))
    trained = load_file(str(te_dir / "text_encoder" / "model.safetensors"))
    # the text encoder is frozen: saved as it was trained (in the lab's fp16 weights), only the UNet moved
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k].half()) for k in saved)
    recipe = json.loads((out / "recipe.json").read_text())
    assert "--text-encoder" in recipe["command"] and "--stop-after 2" in recipe["command"]
    assert recipe["steps_done"] == 2 and recipe["steps"] == 3  # stopped at 2 of a 3-step schedule


def test_both_lab_models_are_lab_models():
    assert is_lab_model("lab") and is_lab_model("lab-clip") and not is_lab_model("runs/lab")


@pytest.mark.slow
def test_the_second_lab_model_draws_every_concept_and_its_end_token_says_which(tmp_path, monkeypatch):
    """The committed lab-clip model draws the lab's concepts on a reduced evaluation (8 images per concept's own
    prompts, 4 per synonym prompts), and its end token tells prompts apart (first model: cosine 0.996). Its weakest
    concept is triangle (full evaluation: 87.5%, cross 93.8%, every other concept and every synonym 100%; reduced
    set at one thread: 6 of 8), so the bar here is the lab's 0.9 on the mean and 5 of 8 for each concept."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from erasure.diffusers_backbone import load_diffusers
    from erasure.lab.classifier import load_classifier
    from erasure.lab.clip_train import text_report
    from erasure.lab.evaluate import EvalSettings, evaluate
    from erasure.lab.model import CLASSIFIER_FILE, CLIP_MODEL_DIR, MODEL_DIR

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    report = evaluate(load_diffusers("lab-clip"), load_classifier(CLASSIFIER_FILE),
                      settings=EvalSettings(seeds_own=4, seeds_syn=2))
    acc = {c: v["accuracy"] for c, v in report["concepts"].items()}
    assert sum(acc.values()) / len(acc) >= 0.9, acc
    for c, v in report["concepts"].items():
        assert v["accuracy"] >= 0.625 and v["synonym_accuracy"] >= 0.75, (c, v)
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    cos = {d: text_report(CLIPTextModel.from_pretrained(d / "text_encoder").float().eval(), tok)["end_token_cosine"]
           for d in (MODEL_DIR, CLIP_MODEL_DIR)}
    assert cos[CLIP_MODEL_DIR] < 0.5 < 0.99 < cos[MODEL_DIR], cos
