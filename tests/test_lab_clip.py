"""The second lab model's recipe (issue 18, item 4): a CLIP-like text encoder trained contrastively, then a UNet
trained on it frozen."""

import json

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
    train_lab_model(out, steps=2, batch_size=4, save_every=10, text_encoder=te_dir, log=lambda m: None)
    saved = load_file(str(out / "text_encoder" / "model.safetensors"))
    trained = load_file(str(te_dir / "text_encoder" / "model.safetensors"))
    # the text encoder is frozen: saved as it was trained (in the lab's fp16 weights), only the UNet moved
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k].half()) for k in saved)
    assert "--text-encoder" in json.loads((out / "recipe.json").read_text())["command"]


def test_both_lab_models_are_lab_models():
    assert is_lab_model("lab") and is_lab_model("lab-clip") and not is_lab_model("runs/lab")
