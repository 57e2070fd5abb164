"""Each operation's params: one struct per operation, its fields' limits and their help
(`msgspec.Meta(description=...)`, which the submit form and the OpenAPI schema show).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class NoopParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A diagnostic job for health checks, tests and benchmarks."""

    duration_s: Annotated[
        float, msgspec.Meta(ge=0, le=3600, description="Total time the job takes, spread over its steps.")
    ] = 0.0
    steps: Annotated[
        int, msgspec.Meta(ge=0, le=100_000, description="How many progress updates it makes.")
    ] = 10
    fail: Annotated[
        bool, msgspec.Meta(description="Fail permanently with `error` once the steps are done.")
    ] = False
    error: Annotated[
        str, msgspec.Meta(max_length=2000, description="The failure message for `fail` and `fail_times`.")
    ] = "noop failed on request"
    fail_times: Annotated[
        int,
        msgspec.Meta(
            ge=0, le=100, description="Fail transiently on the first N deliveries (for retry tests)."
        ),
    ] = 0
    result_bytes: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=10_000_000,
            description="Return a result of about this many bytes (for tests of the result bound).",
        ),
    ] = 0
    hang_s: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=3600,
            description="After the steps, hang this long without looking at the cancel flag (a stuck handler:"
            " only the run-time limit or a cancel stops it).",
        ),
    ] = 0.0
    block_s: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=3600,
            description="After the steps, keep a thread busy this long, checking the cancel flag every"
            " `check_every_s` as whisper and PyAV do between segments and packets.",
        ),
    ] = 0.0
    check_every_s: Annotated[
        float,
        msgspec.Meta(
            ge=0.001,
            le=60,
            description="How long the `block_s` thread works between two looks at the cancel flag.",
        ),
    ] = 0.05


WhisperDevice = Annotated[
    Literal["cpu", "cuda"] | None,
    msgspec.Meta(description="cuda when available, else cpu."),
]
WhisperComputeType = Annotated[
    Literal["int8", "int8_float16", "int16", "float16", "float32"] | None,
    msgspec.Meta(description="float16 on cuda, int8 on cpu."),
]


DEFAULT_MIN_CUE_DURATION = 0.7
"""Seconds a cue stays on screen at least, unless a job asks otherwise."""


class TranscribeParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """faster-whisper options of `transcribe`."""

    model: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=500,
            description="A faster-whisper model name or a local path; tiny.en ships with jobcast.",
        ),
    ] = "tiny.en"
    language: (
        Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2,3}$", description="ISO code; detected when absent.")]
        | None
    ) = None
    task: Annotated[
        Literal["transcribe", "translate"],
        msgspec.Meta(description="transcribe keeps the spoken language; translate writes English."),
    ] = "transcribe"
    beam_size: Annotated[
        int,
        msgspec.Meta(
            ge=1, le=20, description="Width of the beam search: wider is a little more accurate, and slower."
        ),
    ] = 5
    vad_filter: Annotated[
        bool, msgspec.Meta(description="Skip silence (Silero voice activity detection) before decoding.")
    ] = False
    word_timestamps: Annotated[
        bool, msgspec.Meta(description="Times of each word in the segments (slower).")
    ] = False
    initial_prompt: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=4000,
                description="Text that primes the model: names, spelling and style to expect.",
            ),
        ]
        | None
    ) = None
    device: WhisperDevice = None
    compute_type: WhisperComputeType = None
    quality_gate: Annotated[
        bool,
        msgspec.Meta(
            description="Check the segments for loops, empty or filler-only text, reading speed and time on"
            " screen; transcribe loops and empty or filler-only ranges again with safer decoding, keeping the"
            " re-run where it is better, and report it all in the result's `quality`. The timing flags are"
            " reported (`generate_srt` also fixes cue timing).",
        ),
    ] = True
    max_cps: Annotated[
        float,
        msgspec.Meta(
            ge=5,
            le=100,
            description="Characters per second a viewer can read: faster segments are flagged (`generate_srt`"
            " shows such cues longer or merges them).",
        ),
    ] = 20.0
    min_cue_duration: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=10,
            description="Seconds a segment or cue stays on screen at least: shorter ones are flagged"
            " (`generate_srt` shows such cues longer or merges them). In `generate_srt` with the gate on, a"
            " value given must be below `max_cue_duration`; left at its default, it is lowered to half of a"
            " `max_cue_duration` under it.",
        ),
    ] = DEFAULT_MIN_CUE_DURATION


class GenerateSrtParams(TranscribeParams, kw_only=True, forbid_unknown_fields=True):
    """`transcribe` options plus the layout of the subtitles."""

    word_timestamps: Annotated[
        bool,
        msgspec.Meta(description="Long segments are split at word boundaries when word times are known."),
    ] = True
    max_line_length: Annotated[
        int, msgspec.Meta(ge=10, le=200, description="Characters per subtitle line, wrapped at spaces.")
    ] = 42
    max_lines_per_cue: Annotated[
        int, msgspec.Meta(ge=1, le=5, description="Lines per cue; a longer segment becomes several cues.")
    ] = 2
    max_cue_duration: Annotated[
        float,
        msgspec.Meta(
            ge=0.5,
            le=60,
            description="Seconds a cue stays on screen at most; with the gate on, above a"
            " `min_cue_duration` given.",
        ),
    ] = 7.0

    def __post_init__(self) -> None:
        # Params valid before the gate ({"max_cue_duration": 0.6}) stay valid: only a minimum given
        # with the gate on is held to the rule; the default one makes way.
        if not self.quality_gate or self.min_cue_duration < self.max_cue_duration:
            return
        if self.min_cue_duration != DEFAULT_MIN_CUE_DURATION:
            raise ValueError("min_cue_duration must be below max_cue_duration")
        self.min_cue_duration = self.max_cue_duration / 2


class DetectLanguageParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """faster-whisper options of `detect_language`."""

    model: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=500,
            description="A faster-whisper model name or a local path; an English-only one (tiny.en)"
            " always answers `en`.",
        ),
    ] = "tiny.en"
    device: WhisperDevice = None
    compute_type: WhisperComputeType = None


class ConvertParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Options of `convert` (to MP4: H.264 + AAC, or M4A)."""

    video_codec: Annotated[
        Literal["libx264"], msgspec.Meta(description="The video encoder when transcoding (H.264 by x264).")
    ] = "libx264"
    crf: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=51,
            description="Quality when transcoding (lower is better); ignored when `bitrate` is given.",
        ),
    ] = 23
    bitrate: (
        Annotated[
            int,
            msgspec.Meta(ge=50_000, le=100_000_000, description="Video bits per second when transcoding."),
        ]
        | None
    ) = None
    max_height: (
        Annotated[
            int,
            msgspec.Meta(
                ge=16, le=4320, description="Scale taller video down to this height (forces a transcode)."
            ),
        ]
        | None
    ) = None
    audio_only: Annotated[bool, msgspec.Meta(description="Produce an .m4a with the audio alone.")] = False


class FixSrtParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Options of `fix_srt`; the API key is the worker's (JOBCAST_LLM_API_KEY), never a job's."""

    model: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1, max_length=200, description="Chat model; JOBCAST_LLM_MODEL when absent."
            ),
        ]
        | None
    ) = None
    base_url: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^https?://",
                max_length=2000,
                description="OpenAI-compatible endpoint: JOBCAST_LLM_BASE_URL or one of"
                " JOBCAST_LLM_ALLOWED_BASE_URLS; JOBCAST_LLM_BASE_URL when absent.",
            ),
        ]
        | None
    ) = None
    sys_msg: (
        Annotated[
            str,
            msgspec.Meta(max_length=10_000, description="System message replacing the default instructions."),
        ]
        | None
    ) = None
    chunk_size: Annotated[int, msgspec.Meta(ge=1, le=200, description="Cues per request.")] = 20


LanguageCode = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$",
        max_length=35,
        description="A BCP 47 language code: ISO 639 (de, fr, yue), optionally with a region or script"
        " (pt-BR, zh-Hant).",
    ),
]
MAX_TRANSLATE_LANGUAGES = 20
"""Each language is a full pass over the subtitles, so one job asks for a bounded number."""


class TranslateSrtParams(FixSrtParams, kw_only=True, forbid_unknown_fields=True):
    """Options of `translate_srt`: `fix_srt`'s, plus the target languages."""

    languages: Annotated[
        list[LanguageCode],
        msgspec.Meta(
            min_length=1,
            max_length=MAX_TRANSLATE_LANGUAGES,
            description='Target languages as BCP 47 codes, e.g. ["de", "fr"]: one .srt and one .vtt'
            " each; a code given twice is translated once.",
        ),
    ]
    sys_msg: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=10_000,
                description="System message replacing the default instructions; `{language}` in it stands"
                " for the target language's code (appended when it does not appear).",
            ),
        ]
        | None
    ) = None

    def __post_init__(self) -> None:
        # BCP 47 is case-blind: "pt-br" and "PT-BR" are "pt-BR", translated and written once.
        self.languages = list(dict.fromkeys(_canonical_language(code) for code in self.languages))


def _canonical_language(code: str) -> str:
    """A BCP 47 code in its canonical case: language lower, script title, region upper (pt-BR)."""
    language, *subtags = code.split("-")
    cased = [t.upper() if len(t) == 2 else t.title() if len(t) == 4 else t.lower() for t in subtags]
    return "-".join([language.lower(), *cased])
