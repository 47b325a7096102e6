"""The real-image check's data (benchmarks/digits_data.py): what each modality carries, and determinism.

scikit-learn (which ships the digits) is only needed to write the whole set; these use a drawn digit."""

import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location(
    "digits_data", Path(__file__).parent.parent / "benchmarks" / "digits_data.py")
digits_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(digits_data)

SEVEN = np.zeros((8, 8))
SEVEN[1, 1:7] = 16
for row in range(2, 7):
    SEVEN[row, 7 - row] = 12


def test_a_photographed_digit_is_ink_on_paper_at_48_to_160_px():
    sides = set()
    for i in range(30):
        photo, ink, paper = digits_data.photograph(SEVEN, np.random.default_rng([0, i, 1]))
        pixels = np.asarray(photo, np.float32)
        assert photo.mode == "RGB" and 48 <= photo.width == photo.height <= 160
        sides.add(photo.width)
        # the ink is visibly darker or differently coloured than the paper around it
        darkest, median = pixels.sum(2).min(), np.median(pixels.sum(2))
        assert median - darkest > 100, (ink, paper)
    assert len(sides) > 10


def test_the_keypad_tone_carries_the_digits_two_frequencies():
    for label in (0, 5, 9):
        samples, rate = digits_data.keypad_tone(label, np.random.default_rng([1, label, 3]))
        spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
        freqs = np.fft.rfftfreq(samples.size, 1 / rate)
        low, high = digits_data.DTMF[label]
        peak_low = freqs[np.argmax(np.where(freqs < 1100, spectrum, 0))]
        peak_high = freqs[np.argmax(np.where(freqs >= 1100, spectrum, 0))]
        assert abs(peak_low - low) < 0.03 * low and abs(peak_high - high) < 0.03 * high


def test_captions_name_the_digit_and_the_same_seed_gives_the_same_sample():
    words = {digits_data.caption(7, "blue", "white", np.random.default_rng([0, i, 2])) for i in range(40)}
    assert all("seven" in w.lower() or "7" in w for w in words) and len(words) > 5
    a = digits_data.photograph(SEVEN, np.random.default_rng([0, 3, 1]))[0]
    b = digits_data.photograph(SEVEN, np.random.default_rng([0, 3, 1]))[0]
    assert a.tobytes() == b.tobytes()
