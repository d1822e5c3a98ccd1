"""Generate recipes/data/speech_commands/: spoken command words synthesised with espeak-ng.

Run once by a maintainer (needs Debian's `espeak-ng`; users and CI never do):

    apt-get install -y espeak-ng
    .venv/bin/python recipes/data/make_speech_commands.py

Writes 10 command words x 24 synthetic "speakers" (espeak-ng voices x voice variants x
pitch/speed) as 16 kHz mono 16-bit FLAC (placed at a random offset, random gain, background noise at
5-25 dB SNR; seeded), in class subfolders
(``speech_commands/<word>/<speaker>.flac``), plus ``manifest.csv`` (path,label,text,speaker) and
``known_clip.flac`` (a sentence whose transcript is checked by the integration test). The output
is deterministic for a given espeak-ng version (1.51 here). espeak-ng is GPL-3.0; its output
audio is not covered by the GPL. The words and this script are the project's (Apache-2.0).
"""

from __future__ import annotations

import csv
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
# (voice, variant, words per minute, pitch 0-99): 24 distinct synthetic speakers
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd"]
VARIANTS = [("m3", 150, 45), ("f2", 170, 60), ("m7", 135, 35)]
KNOWN_SENTENCE = "Please turn on the kitchen lights."
OUT = Path(__file__).resolve().parent / "speech_commands"
RATE = 16000


def synth(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = resample_poly(audio, RATE, rate).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    if len(loud):
        pad = int(0.05 * RATE)
        audio = audio[max(0, loud[0] - pad): loud[-1] + pad]
    return audio


def roomify(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make a clean synthetic word more like a recording: random placement in up to 1.2 s, gain, noise."""
    lead = int(rng.uniform(0.0, 0.4) * RATE)
    tail = int(rng.uniform(0.0, 0.3) * RATE)
    audio = np.concatenate([np.zeros(lead, np.float32), audio, np.zeros(tail, np.float32)])
    audio = audio * rng.uniform(0.3, 1.0)
    noise = np.cumsum(rng.standard_normal(len(audio))).astype(np.float32)  # brown-ish hum + hiss
    noise = np.diff(noise, prepend=0.0) * 0.3 + (noise - noise.mean()) / (np.abs(noise).max() + 1e-9)
    snr_db = rng.uniform(5.0, 25.0)
    power = np.mean(audio ** 2) + 1e-12
    noise *= np.sqrt(power / (np.mean(noise ** 2) + 1e-12) / 10 ** (snr_db / 10))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for voice in VOICES:
        for variant, speed, pitch in VARIANTS:
            speaker = f"{voice}+{variant}"
            for word in WORDS:
                audio = roomify(synth(word, speaker, speed, pitch), rng)
                path = OUT / word / f"{speaker.replace('+', '_')}.flac"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, audio, RATE, subtype="PCM_16")
                rows.append({"path": str(path.relative_to(OUT)), "label": word, "text": word, "speaker": speaker})
    with open(OUT / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "text", "speaker"])
        writer.writeheader()
        writer.writerows(rows)
    sf.write(OUT / "known_clip.flac", synth(KNOWN_SENTENCE, "en-us+m3", 140, 45), RATE, subtype="PCM_16")
    (OUT / "known_clip.txt").write_text(KNOWN_SENTENCE + "\n")
    print(f"wrote {len(rows)} clips + known_clip.flac to {OUT}")


if __name__ == "__main__":
    main()
