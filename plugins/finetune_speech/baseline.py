"""The simple baseline: log-mel statistics of each clip (decoded at 16 kHz) for a logistic regression."""

from __future__ import annotations

from typing import Any

from finetune_speech.audio import decode

RATE = 16000


def logmel(audio: Any, n_mels: int = 40) -> Any:
    """(frames, n_mels) log-mel energies: 25 ms windows, 10 ms hop."""
    import numpy as np
    from transformers.audio_utils import mel_filter_bank

    n_fft, hop = 400, 160
    if len(audio) < n_fft:
        audio = np.pad(audio, (0, n_fft - len(audio)))
    frames = 1 + (len(audio) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(audio[idx] * np.hanning(n_fft), axis=1)) ** 2
    mel = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=RATE / 2, sampling_rate=RATE, norm="slaney", mel_scale="slaney")
    return np.log(spec @ mel + 1e-6)


def clip_features(audio: Any, segments: int = 6) -> Any:
    """Mean and std of log-mel over the clip, plus the mean of each of ``segments`` equal time slices."""
    import numpy as np

    m = logmel(audio)
    parts = [m.mean(0), m.std(0)] + [s.mean(0) if len(s) else m.mean(0) for s in np.array_split(m, segments)]
    return np.concatenate(parts)


def logmel_features(paths: list[str], max_seconds: float) -> Any:
    import numpy as np

    return np.stack([clip_features(decode(p, RATE, max_seconds)) for p in paths])
