"""translate_srt end to end: files over HTTP, a real llm worker and NATS, the stand-in LLM server;
and the pieces under it (reading SRT or VTT, the translation instruction)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from streams import NatsServer
from tests.conftest import submit, wait_terminal
from tests.llm_server import ChatRequest, FakeLLM, numbered, target_language, translate
from tests.test_media_ops import cancel_when, download, events, llm_settings, running, upload
from workers import subtitles
from workers._instructions import TRANSLATE_SYS_MSG, translating

# jfk.flac's words, as generate_srt cuts them: five cues, one of two lines.
JFK_SRT = """\
1
00:00:00,000 --> 00:00:02,500
And so my fellow Americans,

2
00:00:02,500 --> 00:00:04,800
ask not what your country
can do for you,

3
00:00:04,800 --> 00:00:07,200
ask what you can do

4
00:00:07,200 --> 00:00:09,000
for your country.

5
00:00:09,000 --> 00:00:11,000
Thank you.
"""

JFK_VTT = """\
WEBVTT - jfk.flac

NOTE made by hand

intro
00:00:00.000 --> 00:00:02.500 align:start
And so my fellow Americans,

00:00:02.500 --> 00:00:04.800
ask not what your country
can do for you,

7
00:00:04.800 --> 00:00:07.200
ask what you can do
"""


def timing(cues: list[subtitles.Cue]) -> list[tuple[int, float, float]]:
    return [(c.index, c.start, c.end) for c in cues]


def prefixed(cues: list[subtitles.Cue], language: str) -> list[list[str]]:
    """What the stand-in's translation of `cues` reads: the first line of each cue prefixed."""
    return [[f"[{language}] {c.lines[0]}", *c.lines[1:]] for c in cues]


async def translated(
    client: httpx.AsyncClient, name: str, text: str, **params: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """Submit translate_srt on an uploaded `text`; the completed job and its outputs by name."""
    source = await upload(client, name, text.encode())
    job = await submit(client, type="translate_srt", file_id=source["id"], params=params)
    assert job["pool"] == "llm"
    done = await wait_terminal(client, job["id"])
    assert done["status"] == "completed", done["error"]
    files = {o["name"]: (await download(client, o["file_id"])).text for o in done["result"]["outputs"]}
    return done, files


async def test_two_languages_each_get_an_srt_and_a_vtt_with_timing_kept(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    before = subtitles.validate_srt(JFK_SRT)
    with FakeLLM(api_key="sk-test", delay=0.05) as fake:
        async with running(llm_settings(nats_server, fake)):
            done, files = await translated(client, "jfk.srt", JFK_SRT, languages=["de", "fr"], chunk_size=2)
    result = done["result"]
    assert list(files) == ["jfk.de.srt", "jfk.de.vtt", "jfk.fr.srt", "jfk.fr.vtt"]
    for language in ("de", "fr"):
        for after in (
            subtitles.validate_srt(files[f"jfk.{language}.srt"]),
            subtitles.validate_vtt(files[f"jfk.{language}.vtt"]),
        ):
            assert timing(after) == timing(before)
            assert [c.lines for c in after] == prefixed(before, language)
    assert files["jfk.de.srt"].splitlines()[6:8] == ["[de] ask not what your country", "can do for you,"]
    assert (result["cues"], result["chunks"], result["retries"]) == (5, 3, 0)
    assert result["languages"] == {
        "de": {"translated": 5, "kept": 0, "warnings": [], "retries": 0},
        "fr": {"translated": 5, "kept": 0, "warnings": [], "retries": 0},
    }
    # Three chunks per language, the languages in turn, each request naming its target.
    assert [target_language(r) for r in fake.requests] == ["de"] * 3 + ["fr"] * 3
    assert all(r.body["model"] == "test" for r in fake.requests)
    assert "<br>" in next(r.user for r in fake.requests if "ask not" in r.user)

    # Progress runs over both languages' chunks: one share of 100 per language.
    steps = [
        (e["progress"], e["current_step"])
        async for kind, e in events(client, done["id"])
        if kind == "progress"
    ]
    percents = [p for p, _ in steps]
    assert percents == sorted(percents), steps
    assert steps[-1] == (100.0, "fr (2 of 2): translating chunk 3 of 3")
    assert (50.0, "de (1 of 2): translating chunk 3 of 3") in steps


async def test_a_chunk_the_model_keeps_breaking_stays_in_the_source_language(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    before = subtitles.validate_srt(JFK_SRT)

    def reply(request: ChatRequest) -> str:
        # French answers to the chunk of cues 3-4 always come back one line short.
        answer = translate(request)
        if target_language(request) == "fr" and "ask what you can do" in request.user:
            return "\n".join(answer.splitlines()[:-1])
        return answer

    with FakeLLM(reply=reply) as fake:
        async with running(llm_settings(nats_server, fake)):
            done, files = await translated(client, "jfk.srt", JFK_SRT, languages=["de", "fr"], chunk_size=2)
    result = done["result"]
    assert result["languages"]["de"] == {"translated": 5, "kept": 0, "warnings": [], "retries": 0}
    french = result["languages"]["fr"]
    assert (french["translated"], french["kept"], french["retries"]) == (3, 2, 3)
    [warning] = french["warnings"]
    assert "chunk 2 of 3 (cues 3-4)" in warning
    assert "kept in the source language" in warning
    assert result["retries"] == 3
    after = subtitles.validate_srt(files["jfk.fr.srt"])
    assert timing(after) == timing(before)
    assert [c.lines for c in after] == [*prefixed(before[:2], "fr"), before[2].lines, before[3].lines,
                                        *prefixed(before[4:], "fr")]  # fmt: skip
    assert len(fake.requests) == 3 + 3 + 3  # de, fr, and fr's broken chunk asked three more times


async def test_warnings_are_listed_up_to_a_bound_and_the_others_counted(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    cues = [subtitles.Cue(n, float(n), n + 0.5, [f"line {n}"]) for n in range(1, 14)]

    def reply(request: ChatRequest) -> str:  # no Spanish answer has the right lines
        return "1: ?\n2: ?" if target_language(request) == "es" else translate(request)

    with FakeLLM(reply=reply) as fake:
        async with running(llm_settings(nats_server, fake)):
            done, files = await translated(
                client, "talk.srt", subtitles.to_srt(cues), languages=["es", "it"], chunk_size=1
            )
    spanish = done["result"]["languages"]["es"]
    assert (spanish["translated"], spanish["kept"], spanish["retries"]) == (0, 13, 13 * 3)
    assert len(spanish["warnings"]) == 11
    assert spanish["warnings"][9].startswith("chunk 10 of 13 (cues 10-10): ")
    assert spanish["warnings"][10] == "and 3 more chunks like these"
    assert [c.lines for c in subtitles.validate_srt(files["talk.es.srt"])] == [c.lines for c in cues]
    assert done["result"]["languages"]["it"] == {"translated": 13, "kept": 0, "warnings": [], "retries": 0}


async def test_vtt_input_is_translated_like_srt(client: httpx.AsyncClient, nats_server: NatsServer) -> None:
    before = subtitles.read_subtitles(JFK_VTT)
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            done, files = await translated(client, "jfk.vtt", JFK_VTT, languages=["pt-br"])
    assert list(files) == ["jfk.pt-BR.srt", "jfk.pt-BR.vtt"]
    for after in (
        subtitles.validate_srt(files["jfk.pt-BR.srt"]),
        subtitles.validate_vtt(files["jfk.pt-BR.vtt"]),
    ):
        assert timing(after) == [(1, 0.0, 2.5), (2, 2.5, 4.8), (3, 4.8, 7.2)]
        assert [c.lines for c in after] == prefixed(before, "pt-BR")
    assert done["result"]["languages"] == {
        "pt-BR": {"translated": 3, "kept": 0, "warnings": [], "retries": 0}
    }
    assert [target_language(r) for r in fake.requests] == ["pt-BR"]


async def test_cancel_stops_between_chunks(client: httpx.AsyncClient, nats_server: NatsServer) -> None:
    with FakeLLM(delay=0.2) as fake:
        async with running(llm_settings(nats_server, fake, llm_concurrency=1)):
            source = await upload(client, "jfk.srt", JFK_SRT.encode())
            job = await submit(
                client, type="translate_srt", file_id=source["id"], params={"languages": ["de", "fr"], "chunk_size": 1}
            )  # fmt: skip
            await cancel_when(client, job["id"], min_progress=0)
    assert 1 <= len(fake.requests) < 10  # ten chunks in all; stopped at the next one after the cancel


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "Object missing required field `languages` - at `$.params`"),
        ({"languages": []}, "Expected `array` of length >= 1 - at `$.params.languages`"),
        ({"languages": "de"}, "Expected `array`, got `str` - at `$.params.languages`"),
        ({"languages": ["de", "German"]}, "- at `$.params.languages[1]`"),
        ({"languages": ["de"] * 21}, "Expected `array` of length <= 20 - at `$.params.languages`"),
        ({"languages": ["de"], "chunk_size": 0}, "- at `$.params.chunk_size`"),
        # The worker's key goes only where the operator pointed it, as for fix_srt.
        ({"languages": ["de"], "base_url": "http://llm.example/v1"}, "- at `$.params.base_url`"),
    ],
)
async def test_bad_params_are_refused_naming_the_field(
    client: httpx.AsyncClient, params: dict[str, Any], message: str
) -> None:
    source = await upload(client, "jfk.srt", JFK_SRT.encode())
    response = await client.post(
        "/api/v1/jobs", json={"type": "translate_srt", "file_id": source["id"], "params": params}
    )
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


async def test_languages_are_deduplicated_in_canonical_case(client: httpx.AsyncClient) -> None:
    source = await upload(client, "jfk.srt", JFK_SRT.encode())
    params = {"languages": ["de", "DE", "pt-br", "PT-BR", "zh-hant-tw"]}
    job = await submit(client, type="translate_srt", file_id=source["id"], params=params)
    assert job["params"]["languages"] == ["de", "pt-BR", "zh-Hant-TW"]


def test_read_subtitles_tells_vtt_from_srt_and_numbers_vtt_cues_by_position() -> None:
    vtt = subtitles.read_subtitles(JFK_VTT)
    assert [(c.index, c.lines) for c in vtt] == [
        (1, ["And so my fellow Americans,"]),
        (2, ["ask not what your country", "can do for you,"]),
        (3, ["ask what you can do"]),
    ]
    assert subtitles.read_subtitles("\ufeff" + JFK_SRT) == subtitles.validate_srt(JFK_SRT)
    with pytest.raises(subtitles.SubtitleError, match="expected a cue number"):
        subtitles.read_subtitles("WEBVTTX\n\n00:00:00.000 --> 00:00:01.000\nhi\n")
    with pytest.raises(subtitles.SubtitleError, match="is not after start"):
        subtitles.read_subtitles("WEBVTT\n\n00:00:01.000 --> 00:00:01.000\nhi\n")


def test_the_instruction_names_the_target_language_whatever_the_system_message() -> None:
    assert translating("de").system == TRANSLATE_SYS_MSG.replace("{language}", "de")
    assert translating("fr", "Into {language}, formally.").system == "Into fr, formally."
    own = translating("es", "Translate the subtitles.")
    assert own.system == "Translate the subtitles.\nTarget language (BCP 47 code): es"
    request = ChatRequest(number=1, body={"messages": [{"role": "system", "content": own.system},
                                                       {"role": "user", "content": "1: hi"}]}, authorization="")  # fmt: skip
    assert (target_language(request), numbered(translate(request))) == ("es", [(1, "[es] hi")])
