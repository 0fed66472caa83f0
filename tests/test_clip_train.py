"""CLIP training on shapes captions: loss, captions, tokenizer, a tiny run, zero-shot and retrieval metrics."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

import zoo  # noqa: E402
from tests.method_checks import check_resume_bit_exact, check_two_steps_lower_loss  # noqa: E402
from train.methods.clip import clip_loss  # noqa: E402
from zoo.data import load_dataset, transform_for  # noqa: E402
from zoo.data.captions import HELD_OUT_TEMPLATES, SYNONYMS, TRAIN_TEMPLATES, vocabulary  # noqa: E402
from zoo.data.shapes import BACKGROUNDS, COLOURS, SHAPES  # noqa: E402
from zoo.eval.zeroshot import retrieval_eval, zeroshot_eval  # noqa: E402
from zoo.tokenizers import WordTokenizer  # noqa: E402

CLIP_KW = {"embed_dim": 16, "context_length": 16, "text_width": 32, "text_layers": 1, "text_heads": 2}


def test_clip_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale = torch.tensor(math.log(1 / 0.07))
    s = np.exp(scale.item()) * img.numpy() @ txt.numpy().T
    expected = 0.0
    for i in range(6):  # -log softmax of the matching pair, rows (image->text) and columns (text->image)
        expected += -(s[i, i] - np.log(np.exp(s[i]).sum())) / 12
        expected += -(s[i, i] - np.log(np.exp(s[:, i]).sum())) / 12
    assert clip_loss(img, txt, scale).item() == pytest.approx(expected, rel=1e-5)


def test_captions_name_the_image_concepts():
    ds = load_dataset("shapes_captions", "test", n_test=50)
    again = load_dataset("shapes_captions", "test", n_test=50)
    assert ds.captions == again.captions and len(ds.captions[0]) == 5
    vocab = set(vocabulary())
    held = [re.sub(r"{\w+}", "(.+)", t) for t in HELD_OUT_TEMPLATES]
    for i, (caps, named) in enumerate(zip(ds.captions, ds.caption_concepts)):
        assert any(re.fullmatch(h, caps[0]) for h in held)  # the first test caption is held out
        for cap, concepts in zip(caps, named):
            assert set(re.findall(r"[a-z0-9]+", cap)) <= vocab
            for concept, values in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS)):
                words = SYNONYMS[concept][values[ds.concepts[concept][i]]]
                assert (concept in concepts) == any(re.search(rf"\b{w}\b", cap) for w in words), (cap, concept)
    train = load_dataset("shapes_captions", "train", n_train=200)
    train_res = [re.sub(r"{\w+}", "(.+)", t) for t in TRAIN_TEMPLATES]
    assert all(any(re.fullmatch(r, c) for r in train_res) for caps in train.captions for c in caps)


def test_word_tokenizer():
    tok = WordTokenizer(["a", "red", "circle"], context_length=5)
    out = tok(["A red circle", "a red red red circle zebra"])
    assert out.ids.tolist() == [[5, 2, 3, 4, 6], [5, 2, 3, 3, 6]]
    assert out.truncated == [False, True]
    assert int(out.ids.argmax(1)[0]) == 4  # open_clip's argmax pooling lands on the end token
    with pytest.raises(ValueError, match="empty"):
        tok([""])
    with pytest.raises(TypeError, match="list of strings"):
        tok("a red circle")


def test_tiny_run_lowers_loss(tmp_path):
    check_two_steps_lower_loss(tmp_path, steps=4, method="clip", data="shapes_captions", lr=0.01,
                               batch_size=64, method_kwargs=CLIP_KW)


def test_resume_is_bit_exact(tmp_path):
    check_resume_bit_exact(tmp_path, total=4, cut=2, method="clip", data="shapes_captions", batch_size=64,
                           method_kwargs=CLIP_KW)


def test_export_round_trips_with_its_tokenizer(tmp_path):
    from tests.method_checks import tiny_cfg
    from train.trainer import Trainer

    trainer = Trainer(tiny_cfg(max_steps=1, method="clip", data="shapes_captions", method_kwargs=CLIP_KW),
                      tmp_path, progress=False)
    trainer.fit()
    folder = trainer.export(evaluate=False)
    model = zoo.create_model(str(folder))
    assert isinstance(model, zoo.ClipModel) and model.pretrained_cfg["tokenizer"]["type"] == "words"
    texts = ["a red circle", "something noisy"]
    torch.testing.assert_close(model.embed_text(texts), trainer.method.model.eval().embed_text(texts))


@pytest.fixture(scope="module")
def shipped():
    return zoo.create_model("clip_convnet_shapes", pretrained=True)


def test_zeroshot_matches_hand_computation(shipped):
    ds = load_dataset("shapes", "test", transform=transform_for(shipped), n_test=120)
    images = F.normalize(torch.stack([shipped.embed(ds[i][0][None])[0] for i in range(len(ds))]), dim=1)
    got = zeroshot_eval(shipped, "shapes", progress=False, n_test=120)
    from zoo.eval.zeroshot import PROMPTS

    for task in ("shape", "colour"):
        names, templates = PROMPTS["shapes"][task]
        names = names or ds.concept_names[task]
        right = 0
        for i in range(len(ds)):
            scores = []
            for name in names:  # class embedding: normalised mean of normalised prompt embeddings
                w = shipped.embed_text([t.format(name) for t in templates]).mean(0)
                scores.append(float(images[i] @ (w / w.norm())))
            right += int(np.argmax(scores) == ds.concepts[task][i])
        assert got[f"zeroshot_top1[{task}]"] == pytest.approx(right / len(ds), abs=1e-6)
    assert got["zeroshot_top1"] == got["zeroshot_top1[shape]"]


def test_retrieval_matches_brute_force(shipped):
    ds = load_dataset("shapes_captions", "test", transform=transform_for(shipped), n_test=80)
    images = F.normalize(torch.stack([shipped.embed(ds[i][0][None])[0] for i in range(len(ds))]), dim=1)
    hits = exact = 0
    for i in range(len(ds)):
        order = np.argsort(-(images @ shipped.embed_text([ds.captions[i][0]])[0]).numpy())[:10]
        named = ds.caption_concepts[i][0]
        ok = [all(ds.concepts[c][j] == ds.concepts[c][i] for c in named) for j in order]
        hits += any(ok)
        exact += i in order
    got = retrieval_eval(shipped, progress=False, n_test=80)
    assert got["t2i_recall@10"] == pytest.approx(hits / len(ds))
    assert got["t2i_exact_recall@10"] == pytest.approx(exact / len(ds))


def test_shipped_model_meets_the_bar_and_its_record(shipped):
    m = shipped.pretrained_cfg["metrics"]
    assert m["zeroshot_top1[shape]"] >= 0.9 and m["zeroshot_top1[colour]"] >= 0.9 and m["t2i_recall@10"] >= 0.9
    from zoo.eval import evaluate

    got = evaluate(shipped, "shapes_captions", protocols="zeroshot,retrieval", progress=False)
    for key in ("zeroshot_top1[shape]", "zeroshot_top1[colour]", "t2i_recall@10"):
        assert got[key] == pytest.approx(m[key], abs=1e-3), key
