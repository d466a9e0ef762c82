"""Issue 23 audit, Wan-Dancer music features: the audio file is read as DiffSynth-Studio's ``librosa.load(path,
sr=15360)`` reads it -- channels averaged (not ffmpeg's louder ``-ac 1`` downmix) and resampled by SoX's resampler
at librosa's ``soxr_hq`` precision -- so the 35 features match DiffSynth's ``get_music_base_feature`` for any file
rate, not only for a WAV at 15360 Hz.  (Checked outside the suite with librosa 0.11 against DiffSynth 2.1.12's
function on mono / stereo WAVs at 15360, 16000, 22050 and 44100 Hz: equal up to float rounding, 2e-7 relative.)
librosa is in the test extra, so CI runs the feature comparison; the one-line error without librosa is checked here
with the import blocked, whether or not it is installed."""

from __future__ import annotations

import importlib.util
import sys
import wave

import numpy as np
import pytest

from diffusers_wan_ext.families.dancer import read_music_features
from diffusers_wan_ext.pipelines.dancer_conditioning import music_features
from diffusers_wan_ext.utils.media import read_audio_file

HAS_LIBROSA = importlib.util.find_spec("librosa") is not None


def _write(path, channels: np.ndarray, rate: int):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(channels, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _signal(rate: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(seed)
    return 0.4 * np.sin(2 * np.pi * 330 * t) + 0.1 * rng.standard_normal(t.size)


def test_stereo_files_are_averaged_at_the_channels_gain(tmp_path):
    x = _signal(44100)
    same = read_audio_file(_write(tmp_path / "lr.wav", np.stack([x, x], 1), 44100), 15360)
    mono = read_audio_file(_write(tmp_path / "m.wav", x[:, None], 44100), 15360)
    assert abs(len(mono) - 15360) <= 1 and len(same) == len(mono)
    np.testing.assert_allclose(same, mono, atol=1e-6)  # L = R: the same samples, not 3 dB louder (ffmpeg -ac 1)
    y = _signal(44100, seed=1)
    both = read_audio_file(_write(tmp_path / "xy.wav", np.stack([x, y], 1), 44100), 15360)
    mean = read_audio_file(_write(tmp_path / "mean.wav", ((x + y) / 2)[:, None], 44100), 15360)
    np.testing.assert_allclose(both, mean, atol=1e-4)  # 16-bit rounding of the written mean


def test_resampling_is_band_limited_like_soxr_hq(tmp_path):
    """A 7 kHz tone (the 15360 Hz target's Nyquist is 7680 Hz) keeps its amplitude; a 9 kHz tone is removed."""
    rate, t = 44100, np.arange(44100) / 44100
    kept = read_audio_file(_write(tmp_path / "7k.wav", (0.5 * np.sin(2 * np.pi * 7000 * t))[:, None], rate), 15360)
    cut = read_audio_file(_write(tmp_path / "9k.wav", (0.5 * np.sin(2 * np.pi * 9000 * t))[:, None], rate), 15360)
    assert abs(np.abs(kept[1000:-1000]).max() - 0.5) < 0.01
    assert np.abs(cut[1000:-1000]).max() < 1e-3


@pytest.mark.skipif(not HAS_LIBROSA, reason="librosa (optional, the dancer extra) is not installed")
def test_features_equal_the_reference_steps_at_any_rate(tmp_path):
    import librosa

    # 5 s: the lowest octave of chroma_cens' CQT (the signal halved 6 times) is longer than its 1024-sample FFT
    x, y = _signal(44100, 5.0), _signal(44100, 5.0, seed=2)
    path = _write(tmp_path / "music.wav", np.stack([x, y], 1), 44100)
    # DiffSynth's get_music_base_feature, step by step: load at 30 * 512 Hz, analyse as if at 22050 Hz, hop 512
    data, _ = librosa.load(str(path), sr=15360)
    env = librosa.onset.onset_strength(y=data, sr=22050)
    mfcc = librosa.feature.mfcc(y=data, sr=22050, n_mfcc=20).T
    chroma = librosa.feature.chroma_cens(y=data, sr=22050, hop_length=512, n_chroma=12).T
    peaks = np.zeros_like(env)
    peaks[librosa.onset.onset_detect(onset_envelope=env, sr=22050, hop_length=512)] = 1
    bpm = librosa.feature.tempo(y=librosa.load(str(path))[0])[0]
    beats = np.zeros_like(env)
    beats[librosa.beat.beat_track(onset_envelope=env, sr=22050, hop_length=512, start_bpm=bpm, tightness=100)[1]] = 1
    ref = np.concatenate([env[:, None], mfcc, chroma, peaks[:, None], beats[:, None]], axis=-1)
    ours = music_features(str(path)).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_without_librosa_the_feature_steps_fail_in_one_line(tmp_path, monkeypatch):
    path = _write(tmp_path / "music.wav", _signal(15360)[:, None], 15360)
    monkeypatch.setitem(sys.modules, "librosa", None)  # `import librosa` raises ImportError, as when not installed
    with pytest.raises(ValueError, match=r"^music: .*needs librosa \(pip install librosa, or the dancer extra\)") as e:
        music_features(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^wantodance_music_path: .*music\.wav: .*librosa .*\[dancer\]") as e:
        read_music_features(path)
    assert "\n" not in str(e.value)
