"""espeak-ng, the embedded default engine.

Two paths to the same synthesizer:

* ``library``: libespeak-ng.so.1 through ctypes, AUDIO_OUTPUT_SYNCHRONOUS with a synth
  callback collecting the samples. No process per sentence; ctypes releases the GIL while
  espeak_Synth runs, so the rest of the server keeps going. The library is process-global and
  not thread-safe: every call holds `_LIB_LOCK`.
* ``subprocess``: one ``espeak-ng --stdout`` process per piece (a fallback where the library
  cannot be loaded).

``mode="auto"`` (the default) takes the library when it loads, as it measured faster
(``python -m agent.tts.bench``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
import threading
from typing import Callable, List, Optional

import numpy as np

from .base import TTSEngine, TTSError, clamp_speed

DEFAULT_VOICE = "en-us"
DEFAULT_RATE_WPM = 175  # espeak-ng's own default rate: speed 1.0
RATE_MIN_WPM = 80  # espeakRATE_MINIMUM
RATE_MAX_WPM = 450  # espeakRATE_MAXIMUM

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_espeakINITIALIZE_DONT_EXIT = 0x8000  # report errors instead of exit() on a missing data dir
_espeakRATE = 1
_POS_CHARACTER = 1
_espeakCHARS_UTF8 = 1
_espeakENDPAUSE = 0x1000  # the CLI sets it too: a sentence pause after each piece
_EE_OK = 0
_EE_ERRORS = {-1: "EE_INTERNAL_ERROR", 1: "EE_BUFFER_FULL", 2: "EE_NOT_FOUND"}


class _EspeakEvent(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _Id),
    ]


class _EspeakVoice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_EspeakEvent))


def rate_for_speed(speed: float) -> int:
    """espeak words-per-minute for a speed factor (1.0 = 175 wpm), within espeak's 80..450."""
    return int(min(max(round(DEFAULT_RATE_WPM * clamp_speed(speed)), RATE_MIN_WPM), RATE_MAX_WPM))


class _Library:
    """The one libespeak-ng of this process, initialised once; use only under `_LIB_LOCK`."""

    def __init__(self, path: Optional[str], data_path: Optional[str]):
        name = path or ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise TTSError(f"cannot load the espeak-ng library {name!r} ({e}); install espeak-ng "
                           "(Debian: apt-get install espeak-ng) or use mode='subprocess'") from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_EspeakVoice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                     data_path.encode() if data_path else None,
                                     _espeakINITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise TTSError(f"espeak_Initialize failed ({rate}): espeak-ng data not found "
                           f"(data_path={data_path!r})")
        self.lib = lib
        self.sample_rate = int(rate)
        self.name = name
        self.voice: Optional[str] = None  # the voice set last (SetVoiceByName costs a file load)
        # Where the callback puts samples for the call in progress; None between calls.
        self.sink: Optional[Callable[[np.ndarray], None]] = None
        self._callback = _SynthCallback(self._on_samples)  # kept alive: the C side holds it
        lib.espeak_SetSynthCallback(self._callback)

    def _on_samples(self, wav, numsamples, _events) -> int:
        if numsamples > 0 and wav and self.sink is not None:
            # Copy: the buffer belongs to espeak and is reused.
            self.sink(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0  # 0 = go on

    def set_voice(self, voice: str) -> None:
        if voice == self.voice:
            return
        err = self.lib.espeak_SetVoiceByName(voice.encode())
        if err != _EE_OK:
            # As the CLI's -v does: a language code ("en-gb" lives in the file gmw/en) picks the
            # best voice for that language.
            spec = _EspeakVoice()
            spec.languages = voice.encode()
            err = self.lib.espeak_SetVoiceByProperties(ctypes.byref(spec))
        if err != _EE_OK:
            self.voice = None
            raise TTSError(f"espeak-ng voice {voice!r} not found ({_EE_ERRORS.get(err, err)}); "
                           "see `espeak-ng --voices`")
        self.voice = voice

    def synth(self, text: str, voice: str, rate: int,
              on_chunk: Optional[Callable[[np.ndarray], None]] = None) -> np.ndarray:
        self.set_voice(voice)
        # Set after the voice: a voice change may reset the parameters.
        self.lib.espeak_SetParameter(_espeakRATE, rate, 0)
        chunks: List[np.ndarray] = []

        def sink(x: np.ndarray) -> None:
            chunks.append(x)
            if on_chunk is not None:
                on_chunk(x)

        data = text.encode("utf-8") + b"\0"
        self.sink = sink
        try:
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0,
                                        _espeakCHARS_UTF8 | _espeakENDPAUSE, None, None)
        finally:
            self.sink = None
        if err != _EE_OK:
            raise TTSError(f"espeak_Synth failed: {_EE_ERRORS.get(err, err)}")
        if not chunks:
            return np.zeros(0, np.int16)
        return np.concatenate(chunks)

    def list_voices(self) -> List[str]:
        arr = self.lib.espeak_ListVoices(None)
        out: List[str] = []
        i = 0
        while arr and arr[i]:
            v = arr[i].contents
            langs = v.languages
            if (v.identifier or b"").startswith(b"mb/"):
                i += 1
                continue  # mbrola voices need the mbrola program and its databases
            # `languages` is <priority byte><name>\0... ; the first name is what
            # SetVoiceByName takes (as `espeak-ng --voices` shows it).
            if langs and len(langs) > 1:
                lang = langs[1:].decode(errors="replace")
                if lang not in out:
                    out.append(lang)
            i += 1
        return out


_LIB_LOCK = threading.Lock()
_LIB: Optional[_Library] = None


def _library(path: Optional[str] = None, data_path: Optional[str] = None) -> _Library:
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            _LIB = _Library(path, data_path)
        return _LIB


def _parse_wav(raw: bytes) -> tuple[np.ndarray, int]:
    """PCM16 samples and rate of espeak-ng's --stdout WAV (its sizes are bogus on a pipe, so
    the data chunk runs to the end)."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise TTSError("espeak-ng --stdout did not write a WAV file")
    pos, rate = 12, 0
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            rate = int.from_bytes(raw[pos + 12:pos + 16], "little")
        elif cid == b"data":
            body = raw[pos + 8:]
            body = body[:len(body) // 2 * 2]
            return np.frombuffer(body, "<i2").copy(), rate
        pos += 8 + size
    raise TTSError("espeak-ng --stdout WAV has no data chunk")


class EspeakEngine(TTSEngine):
    """espeak-ng. `voice`: an espeak voice name (``en-us``, ``en-gb``, ``fr``, ``en-us+f3``...);
    `speed` 1.0 = 175 wpm, scaled, within espeak's 80..450 wpm.

    mode: ``"auto"`` (library if it loads, else subprocess), ``"library"``, ``"subprocess"``.
    """

    name = "espeak"

    def __init__(self, voice: str = DEFAULT_VOICE, mode: str = "auto", library: Optional[str] = None,
                 data_path: Optional[str] = None, executable: str = "espeak-ng",
                 timeout_s: float = 30.0):
        if mode not in ("auto", "library", "subprocess"):
            raise TTSError(f"espeak mode must be 'auto', 'library' or 'subprocess', got {mode!r}")
        self.default_voice = voice
        self.data_path = data_path
        self.timeout_s = float(timeout_s)
        self._lib: Optional[_Library] = None
        self._exe: Optional[str] = None
        if mode in ("auto", "library"):
            try:
                self._lib = _library(library, data_path)
            except TTSError:
                if mode == "library":
                    raise
        if self._lib is None:
            self._exe = shutil.which(executable)
            if self._exe is None:
                raise TTSError(f"neither libespeak-ng nor the {executable!r} program was found; "
                               "install espeak-ng (Debian: apt-get install espeak-ng)")
            self.sample_rate = 22050
        else:
            self.sample_rate = self._lib.sample_rate
        self.mode = "library" if self._lib is not None else "subprocess"
        # Fail now, not on the first reply, for an unknown default voice.
        if self._lib is not None:
            with _LIB_LOCK:
                self._lib.set_voice(voice)

    def synthesize(self, text: str, voice: Optional[str] = None, speed: float = 1.0,
                   on_chunk: Optional[Callable[[np.ndarray], None]] = None) -> np.ndarray:
        """See `TTSEngine.synthesize`. `on_chunk(int16 samples)` (library path: as espeak produces
        them; subprocess path: once, at the end) serves first-audio measurements."""
        v = voice or self.default_voice
        rate = rate_for_speed(speed)
        if not text.strip():
            return np.zeros(0, np.float32)
        if self._lib is not None:
            with _LIB_LOCK:
                pcm = self._lib.synth(text, v, rate, on_chunk)
        else:
            pcm = self._synth_process(text, v, rate)
            if on_chunk is not None and len(pcm):
                on_chunk(pcm)
        return pcm.astype(np.float32) / 32768.0

    def _synth_process(self, text: str, voice: str, rate: int) -> np.ndarray:
        cmd = [self._exe, "--stdout", "-v", voice, "-s", str(rate)]
        if self.data_path:
            cmd += ["--path", self.data_path]
        try:
            # Text on stdin: a piece starting with "-" is not an option.
            p = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                               timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TTSError(f"espeak-ng took over {self.timeout_s:g} s") from None
        except OSError as e:
            raise TTSError(f"cannot run espeak-ng: {e}") from None
        if p.returncode != 0 or not p.stdout:
            msg = p.stderr.decode(errors="replace").strip() or f"exit status {p.returncode}"
            raise TTSError(f"espeak-ng failed (voice {voice!r}): {msg}")
        pcm, sr = _parse_wav(p.stdout)
        if sr and sr != self.sample_rate:
            raise TTSError(f"espeak-ng wrote {sr} Hz, expected {self.sample_rate}")
        return pcm

    def check_voice(self, voice: Optional[str]) -> None:
        if not voice:
            return
        if self._lib is not None:
            with _LIB_LOCK:
                self._lib.set_voice(voice)  # a file load at most, then cached
        else:
            self._synth_process("a", voice, DEFAULT_RATE_WPM)

    def voices(self) -> List[str]:
        if self._lib is not None:
            with _LIB_LOCK:
                return self._lib.list_voices()
        p = subprocess.run([self._exe, "--voices"], capture_output=True, text=True,
                           timeout=self.timeout_s)
        # Columns: Pty Language Age/Gender VoiceName File Other-languages
        out: List[str] = []
        for line in p.stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5 and not cols[4].startswith("mb/") and cols[1] not in out:
                out.append(cols[1])
        return out

    def __repr__(self) -> str:
        return f"<EspeakEngine {self.mode} {self.default_voice} {self.sample_rate} Hz>"
