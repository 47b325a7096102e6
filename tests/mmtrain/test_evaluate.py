"""Retrieval recall, accuracy with chance levels, the metrics table and the curves PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmtrain.evaluate import PAIRS, evaluate_embeddings, format_metrics, retrieval_recall
from mmtrain.plots import plot_curves


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def at_angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_perfect_embeddings_recall_one():
    x = unit(300, 32)
    assert retrieval_recall(x, x.clone()) == {1: 1.0, 5: 1.0, 10: 1.0}


def test_random_embeddings_near_chance():
    recall = retrieval_recall(unit(200, 64, seed=1), unit(200, 64, seed=2))
    assert recall[1] < 0.05 and recall[10] < 0.15


def test_hand_built_ranks_exact():
    # gallery at 40, 10, 180 degrees; queries at 0, 10, 0 degrees.
    # query 0: g1 (10) beats its match g0 (40) -> rank 2nd; query 1 hits g1 -> 1st;
    # query 2: g1 and g0 beat its match g2 (180) -> 3rd.
    recall = retrieval_recall(at_angles(0, 10, 0), at_angles(40, 10, 180), ks=(1, 2, 3, 10))
    assert recall[1] == pytest.approx(1 / 3)
    assert recall[2] == pytest.approx(2 / 3)
    assert recall[3] == 1.0 and recall[10] == 1.0


def test_ties_count_against_the_query():
    # gallery rows 0 and 1 identical: each outranks the other's match, so only row 2 is found first
    gallery = at_angles(0, 0, 90)
    assert retrieval_recall(at_angles(0, 0, 90), gallery, ks=(1,))[1] == pytest.approx(1 / 3)
    collapsed = torch.nn.functional.normalize(torch.ones(20, 4), dim=1)
    assert retrieval_recall(collapsed, collapsed, ks=(1,))[1] == 0.0


def test_chunking_does_not_change_results():
    q, g = unit(50, 8, seed=3), unit(50, 8, seed=4)
    assert retrieval_recall(q, g, chunk_size=7) == retrieval_recall(q, g)


def test_non_finite_embeddings_raise():
    q = unit(4, 3)
    q[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(q, unit(4, 3))


def test_pairs_use_only_samples_having_both():
    n = 10
    x = unit(n, 16)
    present = {"text": torch.ones(n, dtype=torch.bool),
               "image": torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool),
               "audio": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)}
    # absent rows are garbage; they must not take part in retrieval
    image = torch.where(present["image"][:, None], x, torch.full_like(x, 1e3))
    metrics = evaluate_embeddings({"text": x, "image": image, "audio": x}, present, None,
                                  torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool), 3)
    assert metrics["text->image/n"] == 6 and metrics["image->text/n"] == 6
    assert metrics["text->audio/n"] == 5 and metrics["image->audio/n"] == 3
    assert metrics["text->image/R@1"] == 1.0
    assert metrics["text->image/R@1/chance"] == pytest.approx(1 / 6)
    assert metrics["image->audio/R@5/chance"] == 1.0  # min(k, n) / n
    assert "accuracy" not in metrics  # no logits


def test_missing_modality_has_no_pair_metrics():
    n = 8
    metrics = evaluate_embeddings({"text": unit(n, 4), "image": unit(n, 4, seed=1)},
                                  {"text": torch.ones(n, dtype=torch.bool), "image": torch.ones(n, dtype=torch.bool)},
                                  None, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool), 2)
    assert {k.split("/")[0] for k in metrics} == {"text->image", "image->text"}
    assert not any("audio" in k for k in metrics)


def test_pair_with_fewer_than_two_samples_skipped():
    present = {"text": torch.tensor([True, False]), "image": torch.tensor([True, True])}
    metrics = evaluate_embeddings({"text": unit(2, 4), "image": unit(2, 4)}, present, None,
                                  torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool), 2)
    assert metrics == {}


def test_accuracy_and_majority_chance_exact():
    labels = torch.tensor([0, 1, 1, 2, 1, 7])  # last sample unlabelled: its label is junk
    has_label = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    predicted = torch.tensor([0, 1, 0, 2, 2, 3])  # 3 of the 5 labelled right
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    metrics = evaluate_embeddings({}, {}, logits, labels, has_label, num_classes=4)
    assert metrics == {"accuracy": pytest.approx(3 / 5), "accuracy/chance": pytest.approx(3 / 5),
                       "accuracy/uniform_chance": 0.25, "accuracy/n": 5}


def test_no_accuracy_without_labels():
    metrics = evaluate_embeddings({}, {}, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long),
                                  torch.zeros(3, dtype=torch.bool), 2)
    assert metrics == {}


def test_format_metrics_shows_chance_and_n():
    n = 20
    everything = {m: torch.ones(n, dtype=torch.bool) for m in ("text", "image", "audio")}
    embeddings = {m: unit(n, 8, seed=i) for i, m in enumerate(everything)}
    labels = torch.arange(n) % 3
    metrics = evaluate_embeddings(embeddings, everything, torch.randn(n, 3), labels,
                                  torch.ones(n, dtype=torch.bool), 3)
    table = format_metrics(metrics)
    lines = table.splitlines()
    assert len(lines) == len(PAIRS) * 7 + 1  # R@1/5/10, class@1/5/10, median rank per pair + accuracy
    assert all("chance" in line and f"n={n}" in line for line in lines)
    assert any(line.startswith("text->image R@1 ") and "(chance 0.050, n=20)" in line for line in lines)
    assert "uniform 0.333" in lines[-1]
    assert "eval/accuracy" in format_metrics({f"eval/{k}": v for k, v in metrics.items()})
    # several datasets: the full table over all of them, then one line per dataset
    several = {**metrics, **{f"{name}/{k}": v for name in ("a", "b") for k, v in metrics.items()}}
    lines = format_metrics(several).splitlines()
    assert len(lines) == len(PAIRS) * 7 + 1 + 3 and lines[-3].split()[:3] == ["dataset", "n", "accuracy"]
    assert lines[-1].split()[:3] == ["b", "20", f"{metrics['accuracy']:.3f}"]


def write_jsonl(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def train_lines(steps: int) -> list[dict]:
    return [{"step": s, "loss": 3 / (s + 1), "loss/contrastive": 2 / (s + 1), "loss/classify": 1 / (s + 1),
             "lr": 1e-3 * min(1, s / 5), "samples_per_s": 100.0, "data_wait": 0.01} for s in range(0, steps, 2)]


def eval_lines() -> list[dict]:
    return [{"step": s, "eval/accuracy": 0.3 + s / 100, "eval/accuracy/chance": 0.25,
             "eval/text->image/R@1": s / 50, "eval/text->image/R@1/chance": 0.01} for s in (10, 20)]


def assert_png_not_blank(path) -> None:
    from PIL import Image
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 200 and image.height > 100
        grey = image.convert("L")
    assert len(grey.getcolors(maxcolors=1 << 16)) > 10  # more than a flat background


def test_plot_curves_with_eval(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    write_jsonl(jsonl, train_lines(24) + eval_lines(), tail='{"step": 24, "lo')  # writer mid-line
    out = plot_curves(jsonl, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert_png_not_blank(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no tmp file left behind


def test_plot_curves_train_only_and_empty(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    write_jsonl(jsonl, train_lines(10))
    assert_png_not_blank(plot_curves(jsonl, tmp_path / "train.png"))
    jsonl.write_text("")
    assert plot_curves(jsonl, tmp_path / "empty.png").stat().st_size > 0


def test_class_retrieval_counts_a_same_class_top_item_and_its_chance_is_exact():
    # 4 classes of 3 identical images; each caption lies next to its class's images
    n = 12
    labels = torch.arange(n) // 3
    centres = unit(4, 8, seed=1)
    image = centres[labels]
    text = torch.nn.functional.normalize(centres[labels] + 0.01 * unit(n, 8, seed=2), dim=-1)
    everything = {m: torch.ones(n, dtype=torch.bool) for m in ("text", "image")}
    metrics = evaluate_embeddings({"text": text, "image": image}, everything, None, labels,
                                  torch.ones(n, dtype=torch.bool), 4)
    assert metrics["text->image/class@1"] == 1.0
    assert metrics["text->image/class@1/chance"] == pytest.approx(3 / 12)
    # k=5 of 12 with 3 of the class: 1 - C(9,5)/C(12,5)
    assert metrics["text->image/class@5/chance"] == pytest.approx(1 - 126 / 792)
    # three identical gallery items per class: ties count against the query, so its match ranks third
    assert metrics["text->image/median_rank"] == 3.0 and metrics["text->image/median_rank/chance"] == 6.5


def test_subset_accuracy_is_taken_on_samples_with_every_modality_and_gives_the_fusion_gain():
    n = 10
    labels = torch.arange(n) % 2
    right = torch.nn.functional.one_hot(labels, 2).float()
    wrong = right.flip(1)
    present = {m: torch.ones(n, dtype=torch.bool) for m in ("text", "image")}
    present["image"][0] = False    # sample 0 lacks an image: left out of every subset's accuracy
    subsets = {("text",): wrong, ("image",): torch.cat([wrong[:5], right[5:]]), ("text", "image"): right}
    metrics = evaluate_embeddings({}, present, right, labels, torch.ones(n, dtype=torch.bool), 2,
                                  subset_logits=subsets)
    assert metrics["accuracy[text]"] == 0.0 and metrics["accuracy[text+image]"] == 1.0
    assert metrics["accuracy[image]"] == pytest.approx(5 / 9) and metrics["accuracy[image]/n"] == 9
    assert metrics["fusion_gain"] == pytest.approx(1 - 5 / 9)


def test_zero_shot_classifies_by_the_nearest_class_prompt_beside_chance():
    from mmtrain.zeroshot import zero_shot_metrics
    classes = unit(3, 8, seed=5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    image = classes[torch.tensor([0, 1, 2, 0, 2, 1])]      # 4 of 6 nearest their own class
    present = {"image": torch.ones(6, dtype=torch.bool), "audio": torch.tensor([1, 1, 0, 0, 0, 0]).bool()}
    audio = classes[torch.tensor([0, 1, 0, 0, 0, 0])]
    metrics = zero_shot_metrics({"image": image, "audio": audio}, present, labels, torch.ones(6, dtype=torch.bool),
                                classes)
    assert metrics["zero_shot[image]"] == pytest.approx(4 / 6) and metrics["zero_shot[image]/chance"] == 2 / 6
    assert metrics["zero_shot[audio]"] == 1.0 and metrics["zero_shot[audio]/n"] == 2


def test_class_prompts_go_through_the_text_tower_as_captions_do(demo_dataset):
    from mmdata import load_description
    from mmtrain.model import FusionModel, ModelConfig
    from mmtrain.trainer import label_names
    from mmtrain.zeroshot import class_embeddings
    d = load_description(demo_dataset)
    names = label_names(demo_dataset)
    assert names and [d.labels[n] for n in names] == list(range(len(names)))
    model = FusionModel(ModelConfig(dim=32, heads=2, embed_dim=16, patch_size=8, text_layers=1, image_layers=1,
                                    audio_layers=1, fusion_layers=1), vocab_size=d.tokenizer.vocab_size,
                        image_size=d.image_size, n_mels=d.n_mels, num_classes=len(names), classify=True,
                        modalities=("text", "image", "audio")).eval()
    with torch.no_grad():
        classes = class_embeddings(model, demo_dataset, names, ["{}", "a photo of a {}"], torch.device("cpu"))
    assert classes.shape == (len(names), 16)
    assert torch.allclose(classes.norm(dim=1), torch.ones(len(names)), atol=1e-5)
    assert not torch.allclose(classes[0], classes[1])   # different names, different embeddings
