"""mmdata.prep.audio: decode -> mono -> resample -> trim/pad -> log-mel (+ FLAC), and its errors.

Inputs are sine waves synthesised with numpy and written with soundfile into
memory; nothing touches disk or the network.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from mmdata.prep.audio import AudioConfig, encode_audio
from mmdata.config import ConfigError, validate_tree
from mmdata.schema import FLAC, MEL, SampleError

RATE = 16000


def sine(freq: float, seconds: float, rate: int = RATE, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def audio_bytes(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def run(data: bytes, **config) -> tuple[np.ndarray, dict, dict]:
    """encode_audio; returns (mel as loaded from its npy, info, members)."""
    members, info = encode_audio(data, AudioConfig(**config))
    mel = np.load(io.BytesIO(members[MEL]), allow_pickle=False)
    return mel, info, members


def mel_centres(config: AudioConfig) -> np.ndarray:
    """Centre frequency (Hz) of each HTK mel filter, as torchaudio spaces them."""
    to_mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    points = np.linspace(to_mel(config.f_min), to_mel(config.sample_rate / 2), config.n_mels + 2)
    return 700 * (10 ** (points[1:-1] / 2595) - 1)


def reason(data: bytes, **config) -> str:
    with pytest.raises(SampleError) as e:
        encode_audio(data, AudioConfig(**config))
    return e.value.reason


# --- features ---------------------------------------------------------------

def test_mel_shape_is_n_mels_by_centred_frames():
    mel, info, _ = run(audio_bytes(sine(440, 1.3)), n_mels=40, hop_length=160)
    assert info["samples"] == round(1.3 * RATE)
    assert mel.shape == (40, 1 + info["samples"] // 160)
    assert info["frames"] == mel.shape[1]


def test_mel_is_float16_npy_loadable_without_pickle():
    mel, _, members = run(audio_bytes(sine(440, 0.5)))
    assert set(members) == {MEL}
    assert mel.dtype == np.float16
    assert np.isfinite(mel).all()


def test_mel_is_stored_in_c_order_so_loaders_copy_it_contiguously():
    mel, _, members = run(audio_bytes(sine(440, 0.5)))
    assert b"'fortran_order': False" in members[MEL][:128]
    assert mel.flags.c_contiguous


def test_silence_is_log_offset():
    mel, _, _ = run(audio_bytes(np.zeros(RATE, np.float32)), log_offset=1e-3)
    assert np.allclose(mel.astype(np.float32), np.log(1e-3), atol=1e-2)


@pytest.mark.parametrize("freq", [1000, 3000])
def test_tone_peaks_in_the_mel_bin_nearest_its_frequency(freq):
    config = AudioConfig(max_seconds=1.0)
    mel, _, _ = run(audio_bytes(sine(freq, 1.0)), max_seconds=1.0)
    assert mel.astype(np.float32).mean(axis=1).argmax() == np.abs(mel_centres(config) - freq).argmin()


def test_higher_tone_peaks_in_a_higher_bin():
    low, _, _ = run(audio_bytes(sine(1000, 0.5)))
    high, _, _ = run(audio_bytes(sine(3000, 0.5)))
    assert high.astype(np.float32).mean(1).argmax() > low.astype(np.float32).mean(1).argmax() + 5


def test_stereo_is_downmixed_by_mean():
    x = sine(1000, 0.5)
    cancelled, info, _ = run(audio_bytes(np.stack([x, -x], axis=1)))
    mono, _, _ = run(audio_bytes(x))
    assert info["channels"] == 2
    # +x and -x average to silence: ~log(1e-6) = -13.8 everywhere vs a loud tone
    assert cancelled.astype(np.float32).max() < -10
    assert mono.astype(np.float32).max() > cancelled.astype(np.float32).max() + 15


# --- length: resampling, trim, pad ---------------------------------------------

@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resamples_to_config_rate(rate):
    _, info, _ = run(audio_bytes(sine(440, 0.75, rate), rate))
    assert info["sample_rate"] == rate and info["duration"] == pytest.approx(0.75)
    assert abs(info["samples"] - 0.75 * RATE) <= 1


def test_trims_to_max_seconds_keeping_the_start():
    # 0.5 s of silence then 1.5 s of tone: a 0.4 s trim must keep only silence
    x = np.concatenate([np.zeros(RATE // 2, np.float32), sine(1000, 1.5)])
    mel, info, _ = run(audio_bytes(x), max_seconds=0.4)
    assert info["samples"] == round(0.4 * RATE)
    assert info["duration"] == pytest.approx(2.0)
    assert mel.astype(np.float32).max() < -10


def test_trims_after_resampling_from_44k():
    _, info, _ = run(audio_bytes(sine(440, 3.0, 44100), 44100), max_seconds=1.0)
    assert info["samples"] == RATE and info["duration"] == pytest.approx(3.0)


def test_pad_gives_fixed_frames():
    short, short_info, _ = run(audio_bytes(sine(440, 0.3)), max_seconds=1.0, pad=True)
    long, _, _ = run(audio_bytes(sine(440, 2.0)), max_seconds=1.0, pad=True)
    assert short.shape == long.shape == (64, 1 + RATE // 160)
    assert short_info["samples"] == RATE and short_info["duration"] == pytest.approx(0.3)
    assert short.astype(np.float32)[:, -5:].max() < -10  # the padding is silence


def test_without_pad_short_clips_keep_their_length():
    _, info, _ = run(audio_bytes(sine(440, 0.3)), max_seconds=1.0)
    assert info["samples"] == round(0.3 * RATE)


# --- formats --------------------------------------------------------------------

def test_soundfile_here_reads_mp3_and_ogg():
    formats = sf.available_formats()
    assert "MP3" in formats and "OGG" in formats


@pytest.mark.parametrize("fmt,subtype", [
    ("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"),
])
def test_formats_decode(fmt, subtype):
    # soundfile>=0.12 wheels bundle libsndfile>=1.1, which writes all of these (MP3 included)
    assert subtype in sf.available_subtypes(fmt), f"soundfile here cannot write {fmt}/{subtype}"
    mel, info, _ = run(audio_bytes(sine(1000, 1.0), RATE, fmt, subtype))
    # lossy codecs add encoder delay/padding: length within 0.1 s, peak still at 1 kHz
    assert abs(info["duration"] - 1.0) < 0.1
    assert mel.astype(np.float32).mean(1).argmax() == np.abs(mel_centres(AudioConfig()) - 1000).argmin()


def test_keep_waveform_returns_flac_at_config_rate():
    _, info, members = run(audio_bytes(sine(440, 0.5, 48000), 48000), keep_waveform=True)
    wave, rate = sf.read(io.BytesIO(members[FLAC]), dtype="float32")
    assert sf.info(io.BytesIO(members[FLAC])).format == "FLAC"
    assert rate == RATE and len(wave) == info["samples"]


def test_flac_holds_the_resampled_waveform_clipped_to_unit_range():
    # a 1 kHz square wave resampled 16 -> 8 kHz rings (Gibbs) past +-1
    square = np.where(sine(1000, 0.5) >= 0, 0.99, -0.99).astype(np.float32)
    expected = torchaudio.functional.resample(torch.from_numpy(square), RATE, 8000).numpy()
    assert np.abs(expected).max() > 1.05
    _, _, members = run(audio_bytes(square, RATE, subtype="FLOAT"), sample_rate=8000, keep_waveform=True)
    wave, _ = sf.read(io.BytesIO(members[FLAC]), dtype="float32")
    assert np.abs(wave - np.clip(expected, -1, 1)).max() < 2 / 32767


def test_deterministic_bytes():
    data = audio_bytes(np.stack([sine(440, 1.0, 44100), sine(660, 1.0, 44100)], axis=1), 44100)
    first, _ = encode_audio(data, AudioConfig(keep_waveform=True))
    second, _ = encode_audio(data, AudioConfig(keep_waveform=True))
    assert first[MEL] == second[MEL] and first[FLAC] == second[FLAC]


# --- errors -----------------------------------------------------------------------

def test_empty_bytes():
    assert reason(b"") == "empty_audio"


def test_wav_with_no_samples():
    assert reason(audio_bytes(np.zeros(0, np.float32))) == "empty_audio"


def test_garbage_bytes():
    assert reason(b"this is not audio at all " * 40) == "corrupt_audio"


def test_truncated_wav_header():
    assert reason(audio_bytes(sine(440, 1.0))[:30]) == "corrupt_audio"


def test_nan_samples():
    x = sine(440, 0.5)
    x[100] = np.nan
    assert reason(audio_bytes(x, subtype="FLOAT")) == "corrupt_audio"


def test_too_short_names_duration_and_key():
    with pytest.raises(SampleError) as e:
        encode_audio(audio_bytes(sine(440, 0.2)), AudioConfig(min_seconds=0.5))
    assert e.value.reason == "audio_too_short"
    assert "0.20 s" in str(e.value) and "min_seconds=0.5" in str(e.value)


def test_shorter_than_one_fft_window_is_too_short():
    assert reason(audio_bytes(sine(440, 0.005))) == "audio_too_short"  # 80 samples < 201


def test_absurd_input_rate_is_corrupt():
    assert reason(audio_bytes(sine(440, 0.5, 500), 500)) == "corrupt_audio"


# --- config -------------------------------------------------------------------------

def test_defaults_validate():
    validate_tree(AudioConfig())
    validate_tree(AudioConfig(win_length=200, f_min=50.0, f_max=7600.0, min_seconds=1.0, pad=True))


@pytest.mark.parametrize("field,value", [
    ("sample_rate", 999), ("sample_rate", 400_000), ("max_seconds", 0.0), ("max_seconds", float("inf")),
    ("min_seconds", -1.0), ("min_seconds", 10.0), ("n_mels", 0), ("n_mels", 202), ("n_fft", 0),
    ("hop_length", 0), ("win_length", 0), ("win_length", 401), ("f_min", -1.0), ("f_min", 8000.0),
    ("f_max", 8001.0), ("log_offset", 0.0), ("on_error", "ignore"),
])
def test_validate_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        AudioConfig(**{field: value}).validate()
    assert e.value.key == field


def test_the_mel_is_made_from_the_16_bit_waveform_the_flac_holds():
    members, info = encode_audio(audio_bytes(sine(440, 0.5, rate=44100), rate=44100),
                                 AudioConfig(keep_waveform=True))
    flac, rate = sf.read(io.BytesIO(members[FLAC]), dtype="int16")
    assert rate == RATE and flac.size == info["samples"] and "clipped" not in info
    from mmdata.prep.audio import mel_members
    again, _ = mel_members(flac.astype("<i2"), info, AudioConfig(keep_waveform=True))
    assert again[MEL] == members[MEL]   # a reader can recompute the features from the FLAC, bit for bit


def test_samples_beyond_full_scale_are_clipped_and_counted_in_the_info():
    hot = sine(440, 0.5, amp=1.5)
    _, info, members = run(audio_bytes(hot, subtype="FLOAT"), keep_waveform=True)
    flac, _ = sf.read(io.BytesIO(members[FLAC]), dtype="int16")
    assert info["clipped"] == int(np.count_nonzero(np.abs(hot) > 1.0)) > 0
    assert flac.max() == 32767 and flac.min() == -32767


# --- interrupts ---------------------------------------------------------------

class InterruptedWhileRead(io.BytesIO):
    """In-memory audio whose reads take a Ctrl-C halfway through the file, as a real signal would arrive
    while soundfile is inside its cffi read callback."""

    def readinto(self, buffer):
        if self.tell() > len(self.getbuffer()) // 2:
            from mmdata import interrupts
            interrupts.interrupt(2, None)
        return super().readinto(buffer)


def test_a_ctrl_c_inside_soundfiles_read_callback_stops_the_run_not_a_truncated_sample(monkeypatch):
    import sys
    import types

    import mmdata.prep.audio as audio
    from mmdata import interrupts
    monkeypatch.setattr(audio, "io", types.SimpleNamespace(BytesIO=InterruptedWhileRead))
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)
    data = audio_bytes(sine(440, 2.0))
    with interrupts.handling_interrupts(), pytest.raises(KeyboardInterrupt):
        encode_audio(data, AudioConfig(max_seconds=2.0))
    # raised when soundfile's call returned, not inside its callback: there cffi would print the traceback
    # and swallow the exception, and the clip would come back cut short, or "corrupt", cached as this
    # input's outcome
    assert not swallowed
    assert not interrupts.requested()   # cleared when the command ends: the next one in this process runs
