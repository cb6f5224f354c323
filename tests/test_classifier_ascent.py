"""Classifier gradient ascent fools the evaluator's heads but not the evaluation: the
adversarial guard (Fréchet distance in feature space, pixel statistics) flags the images."""
import numpy as np
import pytest
import torch

from models.image_engine import ImageRequest
from training.classifier_ascent import (AscentConfig, AscentEngine, RealEngine, all_scenes, ascend,
                                        guarded_evaluation, laplacian_score, target_confidence,
                                        unnatural_rate, unnatural_threshold)
from training.data.shapes import ShapesConfig, attribute_labels, make_shapes
from training.evaluate import train_evaluator

SHAPES = ShapesConfig()
PER_PAIR = 1


@pytest.fixture(scope="module")
def evaluator():
    """Small but real: it must recognise real images, or being fooled would mean nothing."""
    model, metrics = train_evaluator(SHAPES, n_train=2000, steps=150, n_test=300)
    assert metrics["accuracy"]["colour"] > 0.9, metrics
    return model


@pytest.fixture(scope="module")
def setting():
    train = make_shapes(1500, seed=0).images
    threshold = unnatural_threshold(make_shapes(500, seed=1).images)
    return train, threshold, all_scenes(SHAPES, PER_PAIR, seed=0)


def test_ascent_from_a_real_image_flips_the_evaluator_with_a_small_change(evaluator, setting):
    _, _, scenes = setting
    engine = AscentEngine(evaluator, scenes, "other", AscentConfig())
    sample = scenes[:12]
    targets = attribute_labels([s["attrs"] for s in sample])
    out = engine.generate([ImageRequest(s["prompt"], seed=i) for i, s in enumerate(sample)])
    result = torch.from_numpy(np.stack([x[0] for x in out])).permute(0, 3, 1, 2)
    start = engine.last_start
    before = target_confidence(evaluator, start, targets)
    after = target_confidence(evaluator, result, targets)
    # The start shows another shape; the ascent moves the evaluator towards the prompt's.
    assert before["shape"] < 0.3 and after["shape"] > before["shape"] + 0.1, (before, after)
    change = (result.float() - start.float()).abs()
    assert change.max() <= 24 and change.mean() < 24  # the picture is the same picture


def test_ascent_respects_the_budget_and_stays_uint8(evaluator):
    start = make_shapes(4, seed=5).images
    targets = torch.zeros(4, 5, dtype=torch.long)
    out = ascend(evaluator, start, targets, steps=3, step_size=1.0, eps=2.0)
    assert out.dtype == torch.uint8 and out.shape == start.shape
    assert (out.int() - start.int()).abs().max() <= 2


def test_pixel_statistics_separate_real_from_noise(setting):
    _, threshold, _ = setting
    real = make_shapes(300, seed=7).images
    assert unnatural_rate(real, threshold) == 0.0
    noise = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    assert unnatural_rate(noise, threshold) == 1.0
    assert float(laplacian_score(real).median()) < threshold / 2


@pytest.fixture(scope="module")
def real_eval(evaluator, setting):
    train, threshold, scenes = setting
    return guarded_evaluation(RealEngine(evaluator, scenes, "noise", AscentConfig()), evaluator,
                              SHAPES, train, PER_PAIR, 0, threshold)


@pytest.mark.parametrize("start", ["noise", "other"])
def test_the_evaluation_is_not_fooled(evaluator, setting, real_eval, start):
    """The heads move to the prompt (from noise: all the way), yet the images are not
    counted as good: flagged by pixel statistics, and farther in feature space from real
    images of the same attributes than real renders are. Real renders pass both checks."""
    train, threshold, scenes = setting
    fake = guarded_evaluation(AscentEngine(evaluator, scenes, start, AscentConfig()), evaluator,
                              SHAPES, train, PER_PAIR, 0, threshold)
    if start == "noise":
        assert fake["train_accuracy"]["colour"] > 0.9 and fake["train_accuracy"]["shape"] > 0.6, fake
        assert fake["fd"] > 3 * real_eval["fd"], (fake["fd"], real_eval["fd"])
    else:
        assert fake["fd"] > real_eval["fd"], (fake["fd"], real_eval["fd"])
    assert real_eval["unnatural_rate"] == 0.0 and fake["unnatural_rate"] >= 0.9
